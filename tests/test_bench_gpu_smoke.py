"""bench/gpu.py's CPU smoke mode runs every phase end to end and leaves one JSON line per figure.

GPU time is scarce: the script's control flow (phase subprocesses, per-peer guards, JSON lines, peers, timers)
is proven here first, on a tiny model. HF's generate_batch is left out: its warm-up alone takes ~15 s on a CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_tiny_cpu_run_records_every_phase(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "kiln.bench.gpu",
        "--device",
        "cpu",
        "--tiny",
        "--out",
        str(tmp_path),
        "--work-dir",
        str(tmp_path / "work"),
        "--tests",
        "tests/runtime/test_sampling_params.py",
        "--skip",
        "engine.hf_generate_batch",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("gpu_cpu-*.jsonl")
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    header = lines[0]
    assert header["kind"] == "header" and header["torch"] and header["transformers"] and "--tiny" in header["command"]
    status = {(r["phase"], r["name"]): r["status"] for r in lines if r["kind"] == "status"}
    figures = {(r["phase"], r["name"]): r for r in lines if r["kind"] == "figure"}
    assert all(status[(phase, phase)] == "ok" for phase in ("tests", "bandwidth", "decode", "engine", "extras")), status
    failed = {k: v for k, v in status.items() if v not in ("ok", "skipped")}
    assert not failed, [r for r in lines if r["kind"] == "status" and r["status"] not in ("ok", "skipped")]
    assert status[("engine", "hf_generate_batch")] == "skipped"
    assert figures[("tests", "pytest")]["passed"] > 0
    for name in ("d2d_copy", "rms_norm", "add_rms_norm", "silu_mul", "rope"):
        assert figures[("bandwidth", name)]["gb_per_s"] > 0
    for name in ("paged_decode_attention_2x64", "paged_decode_attention_1x128"):  # the tiny stand-ins
        assert figures[("bandwidth", name)]["gb_per_s"] > 0
    for name in ("rms_norm", "add_rms_norm", "silu_mul"):
        assert all(figures[("bandwidth", f"{name}_rows{n}")]["kiln_us"] > 0 for n in (1, 16, 64))
    for name in ("kiln_reference_eager", "hf_eager", "hf_torch_compile"):
        assert figures[("decode", name)]["tok_per_s"] > 0
    kiln, hf = figures[("engine", "kiln_llm_generate")], figures[("engine", "hf_generate_static")]
    assert kiln["useful_tokens"] == hf["useful_tokens"] > 0 and kiln["useful_tok_per_s"] > 0
    assert hf["of_requests"] == 8 and 0 <= hf["agree_all_tokens"] <= hf["agree_first_token"] <= 8
    assert "[engine] figure kiln_llm_generate" in proc.stdout
    assert figures[("extras", "profile_ceilings")]["copy_gbs"] > 0
    assert figures[("extras", "profile_decode_b1")]["ops"] and figures[("extras", "profile_prefill_b1")]["step_ms"] > 0
    assert any("artifact" in line for line in figures[("extras", "cold_start")]["lines"])
    assert status[("extras", "tensor_parallel")] == "skipped"

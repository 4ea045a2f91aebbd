"""Ahead-of-time kernels (codegen/aot.py): which cubins an artifact ships (those its lowered graph launches),
when a load uses them, and that Triton loads an installed entry instead of compiling. Loading on a real GPU is
the GPU check's part (bench/cold_start.py counts the JIT compilations of a cold start there)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.codegen import aot
from kiln.codegen.cross_compile import graph_plans
from kiln.compiler.export import artifact

PLANS = "kiln.codegen.kernels."


@pytest.mark.parametrize(
    "target, built, capability, use, said",
    [
        (None, "3.9.0", 90, False, "without --target"),
        ("cuda:90", "3.9.0", None, False, "need a GPU"),
        ("cuda:90", "3.9.0", 80, False, "sm_90 and this GPU is sm_80"),
        ("cuda:90", "3.6.0", 90, False, "Triton 3.6.0, this is Triton 3.9.0"),
        ("cuda:90", "3.9.0", 90, True, "using its sm_90 cubins"),
    ],
)
def test_cubins_are_used_only_where_they_fit(target, built, capability, use, said):
    decision = aot.decide(target, built, capability, "3.9.0")
    assert decision.use is use and said in decision.reason


class _FakeGPU:
    type = "cuda"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_mismatch_falls_back_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    aot._said.clear()
    said = _Lines()
    logging.getLogger("kiln").addHandler(said)
    try:
        first = aot.prepare(tmp_path, "cuda:90", "3.9.0", _FakeGPU())
        second = aot.prepare(tmp_path, "cuda:90", "3.9.0", _FakeGPU())
    finally:
        logging.getLogger("kiln").removeHandler(said)
    assert not first.use and first == second
    assert said.lines == [f"kiln: artifact kernels: {first.reason}"]


def test_matching_cubins_are_installed_into_tritons_cache(tmp_path, monkeypatch):
    import triton
    from triton import knobs

    entry = tmp_path / "kernels" / "sm_90" / aot.CACHE / "KEY123"
    entry.mkdir(parents=True)
    (entry / "rms_norm.cubin").write_bytes(b"\x7fELF")
    cache = tmp_path / "triton"
    monkeypatch.setattr(knobs.cache, "dir", str(cache))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    decision = aot.prepare(tmp_path / "kernels", "cuda:90", triton.__version__, _FakeGPU())
    assert decision.use
    assert (cache / "KEY123" / "rms_norm.cubin").read_bytes() == b"\x7fELF"
    assert aot.install(entry.parent, cache) == 0  # already there: nothing copied twice


_PROBE = """
import json, sys, torch
from pathlib import Path
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from kiln.codegen import aot, cross_compile as cc
from kiln.codegen.model_step import ModelShapes
from kiln.models.testing import tiny_config

entries, cache = Path(sys.argv[1]), Path(sys.argv[2])
shapes = ModelShapes.from_config(tiny_config("llama").to_dict())
plans = {"kiln.codegen.kernels.rms_norm_plan"}
launch = next(p.launch for p in cc.model_launches(shapes, torch.float32, cc.TARGETS[90], plans=plans))
knobs.cache.dir = str(cache)
installed = aot.install(entries, cache) if entries.is_dir() else 0
with aot.JitCounter() as counter:
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    triton.compile(cc.ast_source(launch), target=GPUTarget("cuda", 90, 32), options=options)
print(json.dumps({"installed": installed, "compiled": counter.compiled, "loaded": counter.loaded}))
"""


def test_an_installed_entry_is_loaded_not_compiled(tmp_path):
    """Cross-compile a kernel as an artifact does, install its cache entries into an empty Triton cache, and
    compile the same launch again: Triton loads it (a cold start with cubins), where an empty cache compiles."""
    from kiln.codegen.cross_compile import cross_compile
    from kiln.models.testing import tiny_config

    plans = {PLANS + "rms_norm_plan"}
    cross_compile(tiny_config("llama").to_dict(), "cuda:90", tmp_path / "kernels", torch.float32, plans=plans)
    entries = tmp_path / "kernels" / "sm_90" / aot.CACHE
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def probe(source: Path, cache: str) -> dict:
        run = subprocess.run(
            [sys.executable, "-c", _PROBE, str(source), str(tmp_path / cache)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(run.stdout.strip().splitlines()[-1])

    assert probe(entries, "warm") == {"installed": 2, "compiled": 0, "loaded": 1}
    assert probe(tmp_path / "none", "cold") == {"installed": 0, "compiled": 1, "loaded": 0}


def test_artifacts_cross_compile_what_their_graph_launches(checkpoint, tmp_path):
    path = checkpoint("llama")
    plain = kiln.compile(path, backend="triton", device="cpu")
    plans = graph_plans(plain.graph_module)
    assert {PLANS + "paged_attention_plan", PLANS + "rms_norm_plan", PLANS + "cache_write_plan"} <= plans
    assert PLANS + "quant_matmul_plan" not in plans and PLANS + "matmul_plan" not in plans  # GEMMs stay on torch
    quantized = kiln.compile(path, backend="triton", device="cpu", quantization="int8")
    assert PLANS + "quant_matmul_plan" in graph_plans(quantized.graph_module)
    saved = artifact.save(plain, tmp_path / "sm90", target="cuda:90")
    files = json.loads((saved / "manifest.json").read_text())["files"]
    assert any(name.startswith(f"kernels/sm_90/{aot.CACHE}/") and name.endswith(".cubin") for name in files)
    assert kiln.load(saved).backend == "triton"  # on the CPU: nothing to install, nothing said
    with pytest.raises(ValueError, match="backend 'reference'"):
        artifact.save(kiln.compile(path, device="cpu"), tmp_path / "ref", target="cuda:90")

"""Ahead-of-time kernels (codegen/aot.py): which cubins an artifact ships (those its lowered graph launches),
when a load uses them, and that Triton's JIT, compiling for sm_90, finds every kernel a served model launches
among them instead of compiling. Launching them on a real GPU is the GPU check's part (bench/cold_start.py
counts the JIT compilations of a cold start there)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.codegen import aot
from kiln.codegen.cross_compile import TARGETS
from kiln.codegen.graph_launches import graph_launches
from kiln.compiler.export import artifact


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


_REPLAY = """
import importlib, json, pickle, pkgutil, sys, torch
from pathlib import Path
from triton import knobs
from kiln.codegen import aot, kernels
from kiln.codegen.jit_target import targeting, warm

for module in pkgutil.iter_modules(kernels.__path__):  # every plan: the kernels they declare are rendered
    importlib.import_module(f"kiln.codegen.kernels.{module.name}")

entries, cache, recorded, limit = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
knobs.cache.dir = str(cache)
installed = aot.install(entries, cache) if entries.is_dir() else 0
launches = pickle.loads(recorded.read_bytes())[:limit]
for launch in launches:  # each tensor as a CPU buffer with the recorded tensor's dtype and 16-byte alignment
    for name, value in launch.args.items():
        if isinstance(value, tuple) and value[0] == "tensor":
            dtype, offset = getattr(torch, value[1]), value[2]
            launch.args[name] = torch.empty(64, dtype=torch.uint8)[offset : offset + 32].view(dtype)
compiled = []
with targeting(90), aot.JitCounter() as counter:
    for launch in launches:
        before = counter.compiled
        warm(launch)
        compiled += [launch.label] * (counter.compiled - before)
print(json.dumps({"installed": installed, "compiled": compiled, "loaded": counter.loaded}))
"""


def _recording(monkeypatch: pytest.MonkeyPatch, into: list) -> None:
    """Every launcher records what it launches (each tensor as its dtype and address modulo 16, what Triton
    specialises on), planning for an sm_90 GPU like the cross-compile does, and still runs it."""
    from kiln.codegen import kernel_plan
    from kiln.codegen.cross_compile import TARGETS

    launch_now = kernel_plan.run

    def record(launch: kernel_plan.Launch) -> None:
        args = {
            name: ("tensor", str(v.dtype).removeprefix("torch."), v.data_ptr() % 16) if isinstance(v, torch.Tensor)
            else v
            for name, v in launch.args.items()
        }  # fmt: skip
        into.append(dataclasses.replace(launch, args=args))
        launch_now(launch)

    for name, module in list(sys.modules.items()):
        if name.startswith("kiln.codegen.kernels.") and getattr(module, "run", None) is launch_now:
            monkeypatch.setattr(module, "run", record)
        if name.startswith("kiln.codegen.kernels.") and hasattr(module, "device_target"):
            monkeypatch.setattr(module, "device_target", lambda device: TARGETS[90])


# llama int8: quantized linears; phi3: regions lowered and inlined. gemma2 (soft-capped, windowed attention),
# gpt2, gpt_neox, mistral (int4), qwen3 (w8a8), olmo2 and starcoder2 (int8) passed it too (left out of CI for time).
@pytest.mark.parametrize("arch, quantization", [("llama", "int8"), ("phi3", None)])
def test_serving_an_artifact_with_cubins_compiles_no_kernel(checkpoint, tmp_path, monkeypatch, arch, quantization):
    """A cold start on a GPU, up to the driver: the launches a real model makes while serving prompts of lengths
    and batch sizes the cross-compile never planned for, replayed through Triton's JIT for sm_90 with only the
    artifact's cache entries installed, load every kernel and compile none; an empty cache compiles."""
    compiled = kiln.compile(checkpoint(arch), backend="triton", device="cpu", quantization=quantization)
    launches: list = []
    _recording(monkeypatch, launches)
    llm = kiln.LLM(compiled, num_kv_blocks=32)
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 13)]
    outs = llm.generate(prompts, kiln.SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    outs += llm.generate(prompts[:1], kiln.SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    assert all(out.error is None for out in outs)
    assert {"paged_attention", "cache_write"} <= {launch.kernel.template for launch in launches}
    saved = artifact.save(compiled, tmp_path / "artifact", target="cuda:90")
    files = json.loads((saved / "manifest.json").read_text())["files"]
    assert any(name.startswith(f"kernels/sm_90/{aot.CACHE}/") and name.endswith(".cubin") for name in files)
    assert kiln.load(saved).backend == "triton"  # on the CPU: nothing to install, nothing said
    (tmp_path / "launches.pkl").write_bytes(pickle.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def replay(entries: Path, cache: str, limit: int) -> dict:
        run = subprocess.run(
            [sys.executable, "-c", _REPLAY, str(entries), str(tmp_path / cache), str(tmp_path / "launches.pkl"),
             str(limit)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(run.stdout.strip().splitlines()[-1])

    warm = replay(saved / "kernels" / "sm_90" / aot.CACHE, "warm", len(launches))
    assert warm["installed"] > 0 and warm["compiled"] == [] and warm["loaded"] == len(launches)
    cold = replay(tmp_path / "none", "cold", 1)
    assert cold["installed"] == 0 and len(cold["compiled"]) == 1 and cold["loaded"] == 0


def test_artifacts_cross_compile_what_their_forward_launches(checkpoint, tmp_path):
    path = checkpoint("llama")
    plain = kiln.compile(path, backend="triton", device="cpu")
    decode = [p for p in graph_launches(plain, TARGETS[90], (("decode_1", 1, 1),)) if p.step == "decode_1"]
    kernels = {p.kernel for p in decode}
    assert {"paged_attention", "paged_attention_merge", "rms_norm", "rope", "cache_write", "gated_act"} <= kernels
    assert not {"matmul", "quant_matmul"} & kernels  # GEMMs stay on torch
    assert all(t.device.type == "meta" for p in decode for t in p.launch.args.values() if isinstance(t, torch.Tensor))
    quantized = kiln.compile(path, backend="triton", device="cpu", quantization="int8")
    assert "quant_matmul" in {p.kernel for p in graph_launches(quantized, TARGETS[90], (("prefill", 2, 7),))}
    with pytest.raises(ValueError, match="backend 'reference'"):
        artifact.save(kiln.compile(path, device="cpu"), tmp_path / "ref", target="cuda:90")

"""Fused regions on backend "triton" (codegen/regions.py): each becomes one generated kernel, matching the
reference backend, and the op counts say what launches; a region one expression cannot say goes back inline;
artifacts keep the kernels and cross-compile them at a model's size."""

from __future__ import annotations

from pathlib import Path

import torch
from hf_reference import run_prefill_then_decode

import kiln
from kiln.codegen.cross_compile import cross_compile
from kiln.compiler.export import artifact

PROMPTS = [[5, 9, 13, 20, 30, 41, 7], [1, 2, 3]]


def _lowering(model: kiln.CompiledModel) -> dict[str, int]:
    return next(r for r in model.report.records if r.name == "lower_triton").counters


def _same_logits(a: kiln.CompiledModel, b: kiln.CompiledModel) -> None:
    want, want_logits = run_prefill_then_decode(a, PROMPTS, steps=3)
    got, got_logits = run_prefill_then_decode(b, PROMPTS, steps=3)
    assert got == want
    for x, y in zip(got_logits, want_logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_regions_launch_as_one_kernel_each(checkpoint, tmp_path: Path) -> None:
    path = checkpoint("gpt2")  # the tanh-GELU of its MLP: six ops, one region per layer, plus a two-op one
    reference = kiln.compile(path, device="cpu")
    triton = kiln.compile(path, device="cpu", backend="triton")
    regions = next(r for r in triton.report.records if r.name == "fuse_regions").counters["regions"]
    assert regions == 4 and _lowering(triton)["regions_as_kernels"] == regions
    assert triton.report.ops_final["kiln.region"] == regions and "region" not in triton.report.ops_final
    assert not [n for n in triton.graph_module.graph.nodes if n.op == "call_module"]
    _same_logits(reference, triton)
    loaded = kiln.load(artifact.save(triton, tmp_path / "gpt2"))  # the region specs are data in graph.json
    _same_logits(reference, loaded)


def test_a_reducing_region_and_an_inlined_one(checkpoint) -> None:
    gemma2 = kiln.compile(checkpoint("gemma2"), device="cpu", backend="triton")  # final logit soft-capping
    assert _lowering(gemma2)["regions_as_kernels"] == 1
    _same_logits(kiln.compile(checkpoint("gemma2"), device="cpu"), gemma2)
    phi3 = kiln.compile(checkpoint("phi3"), device="cpu", backend="triton")  # some of its regions hold views
    counters = _lowering(phi3)
    assert counters["regions_inlined"] > 0 and counters["regions_as_kernels"] > 0
    assert "region" not in phi3.report.ops_final  # inlined regions count as the ops they launch
    _same_logits(kiln.compile(checkpoint("phi3"), device="cpu"), phi3)


def test_region_kernels_cross_compile_at_a_models_size(checkpoint, tmp_path: Path) -> None:
    """GPT-2's regions with a 1B model's MLP width (8,192), at every step's token count, for sm_90: no spills,
    within the shared memory limit (cross_compile raises otherwise)."""
    wide = kiln.compile(checkpoint("gpt2", n_inner=8192), device="cpu", backend="triton", dtype=torch.bfloat16)
    records = cross_compile(wide, "cuda:90", tmp_path, strict=True)
    regions = [r for r in records if r.name.startswith("pointwise")]
    assert regions and all(not r.problems() for r in regions)
    assert any("decode_256" in r.steps for r in regions) and any("prefill_2048" in r.steps for r in regions)

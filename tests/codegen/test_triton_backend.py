"""backend="triton" end to end: a tiny Llama whose kiln ops all run as generated kernels (interpreter on CPU)
gives the reference backend's greedy tokens and logits over a packed prefill and decode steps."""

from __future__ import annotations

import torch
from hf_reference import run_prefill_then_decode
from kernel_checks import DEVICE

import kiln


def test_tiny_llama_triton_matches_reference_and_auto_stays_reference_on_cpu(checkpoint) -> None:
    path = checkpoint("llama")
    reference = kiln.compile(path)  # "auto": the reference backend unless the model sits on a GPU
    assert reference.backend == ("triton" if DEVICE == "cuda" and reference.device.type == "cuda" else "reference")
    triton = kiln.compile(path, backend="triton")
    assert triton.backend == "triton"
    assert "kiln_codegen_kernels_paged_attention_plan_paged_attention(" in triton.code
    assert "torch.ops.kiln" not in triton.code
    lowered = next(r for r in triton.report.records if r.name == "lower_triton").counters
    assert lowered["lowered"] >= triton.num_layers and lowered["kept_reference"] == 0
    prompts = [[1, 5, 9, 200, 31, 7, 8, 40, 41], [3, 4], [100, 101, 102, 103, 104]]
    want, want_logits = run_prefill_then_decode(reference, prompts, steps=5)
    got, got_logits = run_prefill_then_decode(triton, prompts, steps=5)
    assert got == want
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

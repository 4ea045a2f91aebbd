"""fuse_norm: RMSNorm / LayerNorm with the residual add before them become one kiln op, bit-compatible with HF."""

from __future__ import annotations

import pytest
import torch
from test_fuse_linears import assert_same_logits, only
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import kiln
import kiln.ops  # declares the kiln:: ops the op tests call
from kiln.passes.base import op_counts, op_name


@pytest.mark.parametrize(
    "arch, counts",
    [
        ("llama", {"kiln.rms_norm": 1, "kiln.add_rms_norm": 4, "aten.rsqrt": 0}),
        ("gemma", {"kiln.rms_norm": 1, "kiln.add_rms_norm": 4, "aten.rsqrt": 0}),  # (1 + w)
        ("qwen3", {"kiln.rms_norm": 5, "kiln.add_rms_norm": 4, "aten.rsqrt": 0}),  # q/k norms per head
        ("gpt2", {"kiln.add_layer_norm": 5, "aten.layer_norm": 0}),
        ("olmo", {"kiln.layer_norm": 1, "kiln.add_layer_norm": 4, "aten.layer_norm": 0}),  # no weight, no bias
    ],
)
def test_norms_fuse_with_their_residual_add(checkpoint, arch, counts):
    path = checkpoint(arch)
    plain, fused = kiln.compile(path, **only()), kiln.compile(path, **only("fuse_norm"))
    after = op_counts(fused.graph_module)
    assert {k: after[k] for k in counts} == counts
    assert op_counts(plain.graph_module)["aten.add"] > after["aten.add"]
    assert_same_logits(plain, fused)


def test_gemma_weight_offset(checkpoint):
    fused = kiln.compile(checkpoint("gemma"), **only("fuse_norm"))
    calls = [n for n in fused.graph_module.graph.nodes if op_name(n) == "kiln.add_rms_norm"]
    assert {c.args[-1] for c in calls} == {1.0}


def test_bfloat16_graph_matches_through_casts(checkpoint):
    path = checkpoint("llama")
    plain = kiln.compile(path, dtype="bfloat16", **only())
    fused = kiln.compile(path, dtype="bfloat16", **only("fuse_norm"))
    ops = op_counts(fused.graph_module)
    assert ops["kiln.add_rms_norm"] == 4 and ops["aten.rsqrt"] == 0
    assert_same_logits(plain, fused, tol=0.0)  # the same float32 statistics and casts as HF: identical bits


@pytest.mark.parametrize("hf_norm, offset", [(LlamaRMSNorm, 0.0), (GemmaRMSNorm, 1.0)])
def test_rms_norm_is_hf_bit_for_bit_in_bfloat16(hf_norm, offset):
    torch.manual_seed(0)
    norm = hf_norm(64, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(7, 64, dtype=torch.bfloat16), torch.randn(7, 64, dtype=torch.bfloat16)
    out, summed = torch.ops.kiln.add_rms_norm(x, residual, norm.weight, 1e-6, offset)
    assert torch.equal(summed, x + residual)
    assert torch.equal(out, norm(x + residual))

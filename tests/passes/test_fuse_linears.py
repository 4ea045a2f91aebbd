"""fuse_linears: q/k/v and gate/up read one input and become one matmul each, with the same numbers."""

from __future__ import annotations

import torch
from hf_reference import run_prefill_then_decode

import kiln
from kiln.passes.base import op_counts

FUSIONS = ("fuse_linears", "fuse_activation", "fuse_norm", "fuse_rope", "fuse_regions")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def only(*enabled: str) -> dict[str, bool]:
    """Compile flags with just these fusions on."""
    return {f: f in enabled for f in FUSIONS}


def assert_same_logits(a, b, tol: float = 1e-5) -> None:
    for x, y in zip(run_prefill_then_decode(a, PROMPTS, steps=3)[1], run_prefill_then_decode(b, PROMPTS, steps=3)[1]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_qkv_and_gate_up_become_one_matmul_each(checkpoint):
    path = checkpoint("llama")
    plain, fused = kiln.compile(path, **only()), kiln.compile(path, **only("fuse_linears"))
    assert op_counts(plain.graph_module)["aten.linear"] == 2 * 7 + 1
    assert op_counts(fused.graph_module)["aten.linear"] == 2 * 4 + 1  # qkv, o, gate_up, down per layer + head
    assert fused.report.records[3].counters == {"matched": 4, "linears_fused": 10}
    params = dict(fused.graph_module.named_parameters())
    assert params["model_model_layers_0_self_attn_q_k_v_proj_weight"].shape == (64 + 2 * 32, 64)
    assert params["model_model_layers_0_mlp_gate_up_proj_weight"].shape == (2 * 128, 64)
    assert not any(name.endswith(("q_proj_weight", "gate_proj_weight")) for name in params), "old weights kept"
    assert_same_logits(plain, fused)


def test_biases_are_concatenated(checkpoint):
    path = checkpoint("phi")  # q/k/v with biases, and the parallel MLP's fc1 reads the same norm output
    plain, fused = kiln.compile(path, **only()), kiln.compile(path, **only("fuse_linears"))
    params = dict(fused.graph_module.named_parameters())
    bias = params["model_model_layers_0_self_attn_q_proj_self_attn_k_proj_self_attn_v_proj_mlp_fc1_bias"]
    assert bias.shape == (64 + 2 * 32 + 128,)  # q, k, v (2 KV heads of 16), fc1
    assert op_counts(fused.graph_module)["aten.linear"] == 2 * 3 + 1  # q/k/v/fc1, dense, fc2 + head
    assert_same_logits(plain, fused)

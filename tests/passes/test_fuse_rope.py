"""fuse_rope: the cos/sin computation and rotate-half arithmetic become kiln::rope over a compile-time table."""

from __future__ import annotations

import pytest
import torch
from test_fuse_linears import assert_same_logits, only
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kiln
import kiln.ops  # declares the kiln:: ops the op tests call
from kiln.passes.base import op_counts, op_name


@pytest.mark.parametrize("arch, rotary_dim", [("llama", 16), ("gpt_neox", 4), ("phi", 8), ("stablelm", 4)])
def test_rotary_embedding_is_one_op_per_layer(checkpoint, arch, rotary_dim):
    path = checkpoint(arch)  # full rotary, and partial rotary at 25% / 50% / 25% of head_dim 16
    plain, fused = kiln.compile(path, **only()), kiln.compile(path, **only("fuse_rope"))
    before, after = op_counts(plain.graph_module), op_counts(fused.graph_module)
    assert before["aten.cos"] == 1 and before["aten.neg"] == 4
    assert after["kiln.rope"] == 2 and after["aten.cos"] == after["aten.sin"] == after["aten.neg"] == 0
    calls = [n for n in fused.graph_module.graph.nodes if op_name(n) == "kiln.rope"]
    assert {(c.args[4], c.args[5]) for c in calls} == {(rotary_dim, True)}
    cache = dict(fused.graph_module.named_buffers())["rope_cos_sin_cache_0"]
    assert cache.shape == (512, rotary_dim) and cache.dtype == torch.float32
    assert_same_logits(plain, fused)


def test_op_matches_hf_apply_rotary_pos_emb():
    torch.manual_seed(0)
    positions, dim = torch.tensor([0, 3, 7, 100]), 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    q, k = torch.randn(4, 4, dim), torch.randn(4, 2, dim)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1)
    q_out, k_out = torch.ops.kiln.rope(q, k, torch.arange(4), cache, dim, True)
    # HF layout: [batch, heads, T, D] with cos/sin [batch, T, D].
    q_ref, k_ref = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos()[None], emb.sin()[None]
    )
    assert torch.equal(q_out, q_ref[0].transpose(0, 1)) and torch.equal(k_out, k_ref[0].transpose(0, 1))

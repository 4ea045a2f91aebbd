"""Launchers with the exact contracts of the `kiln::` ops; backend "triton" calls these instead of the ops.

Each one allocates its outputs, plans its kernels from the descriptors in templates/, and launches them. They
run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Names are kept short because they appear as
calls in the generated forward (`kiln_codegen_launchers_rms_norm(...)`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kiln.ops.metadata import current_max_query_len

from .launch import device_target, run
from .templates import cache_write, gated_act, paged_attention as attn, quant_matmul, rms_norm as rms_desc, rope as rope_desc


def _rows(x: Tensor) -> Tensor:
    """x as [rows, cols] with unit column stride, a view when possible."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> Tensor:
    """kiln::rms_norm."""
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    run(rms_desc.plan(x2, weight, out.view(-1, x.shape[-1]), eps, weight_offset))
    return out


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float) -> tuple[Tensor, Tensor]:
    """kiln::add_rms_norm: (rms_norm(x + residual), x + residual)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cols = x.shape[-1]
    run(rms_desc.plan(_rows(x), weight, out.view(-1, cols), eps, weight_offset, _rows(residual), res_out.view(-1, cols)))
    return out, res_out


def _gated(gate_up: Tensor, act: str) -> Tensor:
    cols = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], cols, dtype=gate_up.dtype, device=gate_up.device)
    run(gated_act.plan(_rows(gate_up), out.view(-1, cols), act))
    return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """kiln::silu_mul."""
    return _gated(gate_up, "silu")


def gelu_mul(gate_up: Tensor, approximate: str) -> Tensor:
    """kiln::gelu_mul."""
    return _gated(gate_up, "gelu_tanh" if approximate == "tanh" else "gelu")


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool) -> tuple[Tensor, Tensor]:
    """kiln::rope: new rotated (q, k); the kernel itself can also rotate in place."""
    q, k = _unit_last(q), _unit_last(k)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    run(rope_desc.plan(q, k, q_out, k_out, positions, cos_sin_cache, rotary_dim, neox_style))
    return q_out, k_out


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, block_tables: Tensor,
    seq_lens: Tensor, query_start_loc: Tensor, scale: float, window: int, softcap: float,
    num_splits: int | None = None,
) -> Tensor:
    """kiln::paged_attention: write the step's K/V into the cache, then attend. `num_splits` overrides the
    split-KV choice (tests exercise the merge under the interpreter with it)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    run(cache_write.plan(k, v, k_cache, v_cache, slot_mapping))
    tokens, heads, _ = q.shape
    num_seqs = seq_lens.shape[0]
    # A decode step (one token per sequence) needs no host sync: that keeps it capturable in a CUDA graph.
    # The runner passes the longest query as a host integer; reading it back from the device (a sync) is the
    # fallback for callers that build metadata by hand. A decode step is 1 either way (CUDA graphs rely on it).
    max_q = 1 if tokens == num_seqs else current_max_query_len() or \
        int((query_start_loc[1:] - query_start_loc[:-1]).max())
    kv_heads, v_dim = k_cache.shape[2], v_cache.shape[-1]
    target = device_target(q.device)
    config, splits = attn.choose(num_seqs, max_q, heads, kv_heads, q.shape[-1], v_dim, q.dtype, target)
    splits = num_splits or splits
    out = torch.empty(tokens, heads, v_dim, dtype=q.dtype, device=q.device)
    partial = lse = None
    if splits > 1:
        partial = torch.empty(tokens, heads, splits, v_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    for launch in attn.plan(q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, window,
                            softcap, max_q, config, splits, partial, lse):
        run(launch)
    return out


# kiln op name -> launcher; ops without an entry keep their torch reference (layer_norm, ...).
LOWERINGS = {
    "kiln.rms_norm": rms_norm,
    "kiln.add_rms_norm": add_rms_norm,
    "kiln.silu_mul": silu_mul,
    "kiln.gelu_mul": gelu_mul,
    "kiln.rope": rope,
    "kiln.paged_attention": paged_attention,
    **quant_matmul.LOWERINGS,  # kiln::linear_int8 / linear_w8a8 / linear_int4
}

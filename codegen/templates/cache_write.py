"""Descriptor of cache_write.py.jinja: the step's K/V into the paged cache at slot_mapping (vLLM's
reshape_and_cache), the first half of kiln::paged_attention."""
from __future__ import annotations

import torch

from kiln.codegen.launch import Launch, next_pow2

TEMPLATE = "cache_write"


def plan(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> Launch:
    """k [T, H, D], v [T, H, Dv] with unit last stride; caches [num_blocks, block_size, H, D] contiguous."""
    tokens, heads, d = k.shape
    dv = v.shape[-1]
    args = [
        ("k_ptr", k), ("v_ptr", v), ("k_cache_ptr", k_cache), ("v_cache_ptr", v_cache), ("slot_ptr", slot_mapping),
        ("k_stride_t", k.stride(0)), ("k_stride_h", k.stride(1)), ("v_stride_t", v.stride(0)),
        ("v_stride_h", v.stride(1)), ("n_heads", heads),
    ]
    constexprs = {"HEAD_D": d, "HEAD_DV": dv, "BLOCK_H": next_pow2(heads), "BLOCK_D": next_pow2(d),
                  "BLOCK_DV": next_pow2(dv)}
    return Launch(TEMPLATE, {}, args, constexprs, (tokens,), num_warps=2)

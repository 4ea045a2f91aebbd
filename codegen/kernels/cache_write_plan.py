"""Plan of cache_write.py.jinja: the step's K/V into the paged cache at slot_mapping (vLLM's reshape_and_cache),
the first half of kiln::paged_attention."""

from __future__ import annotations

import torch

from ..kernel_plan import Launch, next_pow2
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, const, index, ptr, scalar

KERNEL = Kernel(
    "cache_write",
    "kernel",
    (
        ptr("k_ptr"),
        ptr("v_ptr"),
        ptr("k_cache_ptr"),
        ptr("v_cache_ptr"),
        index("slot_ptr"),
        scalar("k_stride_t"),
        scalar("k_stride_h"),
        scalar("v_stride_t"),
        scalar("v_stride_h"),
        scalar("n_heads"),
        const("HEAD_D"),
        const("HEAD_DV"),
        const("BLOCK_H"),
        const("BLOCK_D"),
        const("BLOCK_DV"),
    ),
)


def plan(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> Launch:
    """k [T, H, D], v [T, H, Dv] with unit last stride; caches [num_blocks, block_size, H, D] contiguous."""
    tokens, heads, d = k.shape
    dv = v.shape[-1]
    args = {
        "k_ptr": k,
        "v_ptr": v,
        "k_cache_ptr": k_cache,
        "v_cache_ptr": v_cache,
        "slot_ptr": slot_mapping,
        "k_stride_t": k.stride(0),
        "k_stride_h": k.stride(1),
        "v_stride_t": v.stride(0),
        "v_stride_h": v.stride(1),
        "n_heads": heads,
        "HEAD_D": d,
        "HEAD_DV": dv,
        "BLOCK_H": next_pow2(heads),
        "BLOCK_D": next_pow2(d),
        "BLOCK_DV": next_pow2(dv),
    }
    return Launch(KERNEL, {}, args, (tokens,), num_warps=2)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """The step's K/V into a paged cache of the step's block size."""
    s, t = step.shapes, step.tokens
    k = step.tensor(t, s.kv_heads, s.head_dim)
    k_cache, v_cache = (step.tensor(4096, step.block_size, s.kv_heads, s.head_dim) for _ in range(2))
    return [Planned("cache_write", step.name, plan(k, k, k_cache, v_cache, step.tensor(t, dtype=torch.int64)))]

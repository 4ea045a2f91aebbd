"""Plan of rope.py.jinja: kiln::rope, one program per token over all q and k heads (unsloth style), at
ragged per-token positions; in place when the outputs are the inputs. Flags: neox (rotate-half vs GPT-J
interleaved) and copy_rest (partial rotary written to new tensors: the unrotated dims are copied)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_plan import Launch, next_pow2, run
from ..lowerings import lowers, unit_last
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, const, index, ptr, scalar

KERNEL = Kernel(
    "rope",
    "kernel",
    (
        ptr("q_ptr"),
        ptr("k_ptr"),
        ptr("q_out_ptr"),
        ptr("k_out_ptr"),
        index("positions_ptr"),
        ptr("cos_sin_ptr"),
        scalar("q_stride_t"),
        scalar("q_stride_h"),
        scalar("k_stride_t"),
        scalar("k_stride_h"),
        scalar("q_out_stride_t"),
        scalar("q_out_stride_h"),
        scalar("k_out_stride_t"),
        scalar("k_out_stride_h"),
        scalar("n_q_heads"),
        scalar("n_kv_heads"),
        scalar("cache_stride"),
        const("HALF"),
        const("REST"),
        const("BLOCK_HQ"),
        const("BLOCK_HK"),
        const("BLOCK_R"),
        const("BLOCK_REST"),
    ),
)
REFERENCE = "kiln::rope"


def plan(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int,
    neox_style: bool,
) -> Launch:
    """q/q_out [T, Hq, D], k/k_out [T, Hkv, D] with unit last stride; cos_sin_cache [max_pos, rotary_dim]."""
    tokens, hq, head_dim = q.shape
    hk = k.shape[1]
    half, rest = rotary_dim // 2, head_dim - rotary_dim
    in_place = q_out is q and k_out is k
    args = {
        "q_ptr": q,
        "k_ptr": k,
        "q_out_ptr": q_out,
        "k_out_ptr": k_out,
        "positions_ptr": positions,
        "cos_sin_ptr": cos_sin_cache,
        "q_stride_t": q.stride(0),
        "q_stride_h": q.stride(1),
        "k_stride_t": k.stride(0),
        "k_stride_h": k.stride(1),
        "q_out_stride_t": q_out.stride(0),
        "q_out_stride_h": q_out.stride(1),
        "k_out_stride_t": k_out.stride(0),
        "k_out_stride_h": k_out.stride(1),
        "n_q_heads": hq,
        "n_kv_heads": hk,
        "cache_stride": cos_sin_cache.stride(0),
        "HALF": half,
        "REST": rest,
        "BLOCK_HQ": next_pow2(hq),
        "BLOCK_HK": next_pow2(hk),
        "BLOCK_R": next_pow2(half),
        "BLOCK_REST": next_pow2(max(rest, 1)),
    }
    flags = {"neox": bool(neox_style), "copy_rest": rest > 0 and not in_place}
    return Launch(KERNEL, flags, args, (tokens,), num_warps=4 if hq * half >= 512 else 2)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """Rotary embedding of the step's q and k, in place, over the model's whole position table."""
    s, t = step.shapes, step.tokens
    q, k = step.tensor(t, s.heads, s.head_dim), step.tensor(t, s.kv_heads, s.head_dim)
    cos_sin = step.tensor(s.max_positions, s.rotary_dim, dtype=torch.float32)
    return [
        Planned("rope", step.name, plan(q, k, q, k, step.tensor(t, dtype=torch.int64), cos_sin, s.rotary_dim, True))
    ]


# The launcher: the op's exact contract, called by backend "triton" in place of the op ---------------


@lowers("kiln.rope")
def rope(
    q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool
) -> tuple[Tensor, Tensor]:
    """kiln::rope: new rotated (q, k); the kernel itself can also rotate in place."""
    q, k = unit_last(q), unit_last(k)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    run(plan(q, k, q_out, k_out, positions, cos_sin_cache, rotary_dim, neox_style))
    return q_out, k_out

"""What backend "reference" calls for each graph target: a C kernel where one covers the call, else the op's
pure-torch reference.

The op references (ops/) are the specification and stay pure torch; the choice "run the C kernel for this op on
CPU when it applies" lives here. Each function below has its op's signature and decides per call (float32 CPU
tensors, contiguous last dim, the library built: see `kernels.applies`), falling back to the reference, so the
lowered graph runs on any device and dtype. `reference_calls()` is the table `LowerToReference` applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from kiln.ops import attention, fused, quant
from kiln.ops.registry import references

from . import kernels

# Sequences adding at most this many tokens attend through the decode kernel, one row per token.
SHORT_QUERY = 17


def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> Tensor:
    """kiln::paged_attention: the C cache write; decode rows (one new token) read the cache blocks in place through
    the C kernel, and so do the tokens of a batch whose sequences add at most SHORT_QUERY tokens each (one decode
    row per token, over its causal prefix); only batches with longer prefill chunks pay for a torch formulation."""
    if not (kernels.applies(q, k, v, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return attention.paged_attention(
            q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, window, softcap
        )
    num_tokens = q.shape[0]
    args = (scale, window, softcap)
    kernels.cache_write(k, v, k_cache, v_cache, slot_mapping)
    if num_tokens == seq_lens.numel():
        return kernels.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, *args)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    if int(query_lens.max()) <= SHORT_QUERY:  # e.g. speculative verification: 1 + k tokens per sequence
        # Each token is a decode row over its own causal prefix (its sequence's blocks, a shorter length).
        owner = torch.arange(seq_lens.numel()).repeat_interleave(query_lens.long(), output_size=num_tokens)
        behind = query_start_loc[1:].long()[owner] - 1 - torch.arange(num_tokens)  # later tokens of its sequence
        return kernels.paged_decode(q, k_cache, v_cache, block_tables[owner], seq_lens[owner] - behind, *args)
    decode = query_lens == 1
    if not bool(decode.any()):
        return _attend_prefill(q, k, v, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args)
    out = q.new_empty(num_tokens, q.shape[1], v_cache.shape[-1])
    dec_seqs, pre_seqs = decode.nonzero().squeeze(1), (~decode).nonzero().squeeze(1)
    dec_tokens = query_start_loc[:-1].long()[dec_seqs]
    out[dec_tokens] = kernels.paged_decode(
        q[dec_tokens], k_cache, v_cache, block_tables[dec_seqs], seq_lens[dec_seqs], *args
    )
    pre_tokens = (~decode).repeat_interleave(query_lens.long(), output_size=num_tokens).nonzero().squeeze(1)
    pre_lens = query_lens[pre_seqs]
    pre_starts = torch.cat([pre_lens.new_zeros(1), pre_lens.cumsum(0)])
    out[pre_tokens] = _attend_prefill(
        q[pre_tokens],
        k[pre_tokens],
        v[pre_tokens],
        k_cache,
        v_cache,
        block_tables[pre_seqs],
        seq_lens[pre_seqs],
        pre_starts,
        *args,
    )
    return out


def _attend_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> Tensor:
    """Prefill chunks. A sequence with no cached context (a fresh prompt, the common case) has this step's own
    k/v as its keys: causal SDPA per sequence (torch's CPU flash kernel), with no cache gather, no padding and no
    mask tensor. The others (continued chunks, prefix-cache hits) take the reference's padded formulation over the
    cache, as do windows, soft-capping, and callers such as the quantized-cache op that pass no k/v and attend over
    what they wrote."""
    args = (scale, window, softcap)
    if window > 0 or softcap > 0.0 or k.shape[0] != q.shape[0]:
        return attention.attend_padded(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    continued = []
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        if lens[i] != b - a:
            continued.append(i)
            continue
        # [1, H, L, D] with a batch dim: torch's CPU flash kernel (3-D inputs take the slower math path).
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[None, a:b].transpose(1, 2),
            k[None, a:b].transpose(1, 2).to(q.dtype),
            v[None, a:b].transpose(1, 2).to(q.dtype),
            is_causal=True,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )[0].transpose(0, 1)
    if continued:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=q.device) for i in continued])
        sizes = torch.tensor([0] + [starts[i + 1] - starts[i] for i in continued], device=q.device)
        seqs = torch.tensor(continued, device=q.device)
        out[rows] = attention.attend_padded(
            q[rows],
            k_cache,
            v_cache,
            block_tables[seqs],
            seq_lens[seqs],
            sizes.cumsum(0).to(query_start_loc.dtype),
            *args,
        )
    return out


def paged_attention_quant(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> Tensor:
    """kiln::paged_attention_quant attending through the C decode path above."""
    return quant.attend_quantized(
        paged_attention,
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        window,
        softcap,
    )


def rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> Tensor:
    """kiln::rms_norm in one C pass."""
    if kernels.applies(x, weight):
        return kernels.rms_norm(x, None, weight, eps, weight_offset)[0]
    return fused.rms_norm(x, weight, eps, weight_offset)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float
) -> tuple[Tensor, Tensor]:
    """kiln::add_rms_norm: the residual add and the norm in one C pass."""
    if kernels.applies(x, residual, weight) and x.shape == residual.shape:
        return cast("tuple[Tensor, Tensor]", kernels.rms_norm(x, residual, weight, eps, weight_offset))
    return fused.add_rms_norm(x, residual, weight, eps, weight_offset)


def silu_mul(gate_up: Tensor) -> Tensor:
    """kiln::silu_mul in one C pass."""
    if kernels.applies(gate_up):
        return kernels.silu_mul(gate_up)
    return fused.silu_mul(gate_up)


def rope(
    q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool
) -> tuple[Tensor, Tensor]:
    """kiln::rope: q and k each rotated in one C pass."""
    if kernels.applies(q, k, cos_sin_cache):
        return (
            kernels.rope(q, positions, cos_sin_cache, rotary_dim, neox_style),
            kernels.rope(k, positions, cos_sin_cache, rotary_dim, neox_style),
        )
    return fused.rope(q, k, positions, cos_sin_cache, rotary_dim, neox_style)


def linear_int8(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """kiln::linear_int8: at decode sizes the C loop streams the int8 weights (a quarter of float32's bytes) in
    place; otherwise the reference dequantizes the weight for torch's GEMM."""
    if (
        x.numel() <= kernels.SMALL_LINEAR_ROWS * x.shape[-1]
        and weight.is_contiguous()
        and kernels.applies(x, scale, bias)
        and scale.is_contiguous()
        and weight.is_cpu
    ):
        return kernels.small_linear(x, weight, scale, bias)
    return quant.linear_int8(x, weight, scale, bias)


def linear_int8_packed(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """kiln::linear_int8_packed: the C loop over the weight tiles at decode sizes, else `linear_int8` above over
    the unpacked weight."""
    if (
        x.numel() <= kernels.SMALL_LINEAR_ROWS * x.shape[-1]
        and packed.is_cpu
        and packed.is_contiguous()
        and kernels.applies(x, scale, bias)
        and scale.is_contiguous()
    ):
        return kernels.linear_int8_packed(x, packed, scale, bias)
    return linear_int8(x, quant.unpack_int8(packed), scale, bias)


def linear_w8a8_packed(
    x: Tensor, packed: Tensor, scale: Tensor, input_scale: Tensor | None, bias: Tensor | None
) -> Tensor:
    """kiln::linear_w8a8_packed: the C kernel where it applies (bit for bit the reference), else the reference."""
    if (
        packed.is_cpu
        and packed.is_contiguous()
        and kernels.applies(x, scale, input_scale, bias)
        and scale.is_contiguous()
        and (input_scale is None or input_scale.is_contiguous())
    ):
        return kernels.linear_w8a8_packed(x, packed, scale, input_scale, bias)
    return quant.linear_w8a8_packed(x, packed, scale, input_scale, bias)


def op_calls() -> dict[Any, Callable[..., Any]]:
    """{kiln op: its C-backed function above}, for the ops the CPU backend has kernels for. The quantize pass's
    calibration runs these too, so the activations it searches scales on are those the compiled CPU model
    computes for these ops."""
    kiln = torch.ops.kiln
    return {
        kiln.paged_attention.default: paged_attention,
        kiln.paged_attention_quant.default: paged_attention_quant,
        kiln.rms_norm.default: rms_norm,
        kiln.add_rms_norm.default: add_rms_norm,
        kiln.silu_mul.default: silu_mul,
        kiln.rope.default: rope,
        kiln.linear_int8.default: linear_int8,
        kiln.linear_int8_packed.default: linear_int8_packed,
        kiln.linear_w8a8_packed.default: linear_w8a8_packed,
    }


def reference_calls() -> dict[Any, Callable[..., Any]]:
    """What backend "reference" calls in place of each graph target: every kiln op's reference (ops/registry.py)
    or, where this module has one, its C-backed function; and for `aten.linear` kiln's CPU linear (a C loop for
    small-batch decode, oneDNN over blocked weights above that, torch elsewhere)."""
    return {**references(), **op_calls(), torch.ops.aten.linear.default: kernels.linear}

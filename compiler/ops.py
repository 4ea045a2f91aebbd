"""The op vocabulary of kiln's IR: `torch.library` custom ops with a torch reference and a fake implementation.

Each op is declared from a plain module-level function (`paged_attention_op = custom_op(..., paged_attention)`),
its reference. The references are what backend "reference" runs, called directly (see `reference_calls`);
they are vectorised over the whole packed batch (no per-sequence Python loops) and hand float32 CPU work to the
C kernels of `cpu_kernels`, so they double as a usable CPU engine.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor

from . import cpu_kernels


def _token_layout(query_start_loc: Tensor, seq_lens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per packed token: its sequence, its row within the sequence's new tokens, its absolute position."""
    qsl = query_start_loc.long()
    query_lens = qsl[1:] - qsl[:-1]
    num_seqs = query_lens.numel()
    seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=qsl.device), query_lens, output_size=num_tokens)
    row = torch.arange(num_tokens, device=qsl.device) - qsl[seq_id]
    context_lens = seq_lens.long() - query_lens
    positions = context_lens[seq_id] + row
    max_query_len = int(query_lens.max()) if num_seqs else 0
    return seq_id, row, positions, max_query_len


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
    """Write the step's K/V into the paged cache, then attend each token over its own sequence, causally.

    q [T, Hq, D], k/v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]. A token at absolute position p sees
    cached positions j <= p (and p - j < window when window > 0). softcap > 0 applies tanh soft-capping to the
    scores (Gemma 2 style). Returns [T, Hq, Dv].
    """
    num_tokens = q.shape[0]
    _, _, kv_heads, head_dim = k_cache.shape
    args = (scale, window, softcap)
    if not (cpu_kernels.applies(q, k, v, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, v_cache.shape[-1]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return _attend_padded(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args)
    cpu_kernels.cache_write(k, v, k_cache, v_cache, slot_mapping)
    # Decode rows (one new token) read the cache blocks in place through the C kernel; only sequences with
    # several new tokens (prefill chunks) pay for the padded torch formulation.
    if num_tokens == seq_lens.numel():
        return cpu_kernels.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, *args)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    decode = query_lens == 1
    if not bool(decode.any()):
        return _attend_prefill(q, k, v, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args)
    out = q.new_empty(num_tokens, q.shape[1], v_cache.shape[-1])
    dec_seqs, pre_seqs = decode.nonzero().squeeze(1), (~decode).nonzero().squeeze(1)
    dec_tokens = query_start_loc[:-1].long()[dec_seqs]
    out[dec_tokens] = cpu_kernels.paged_decode(
        q[dec_tokens], k_cache, v_cache, block_tables[dec_seqs], seq_lens[dec_seqs], *args)
    pre_tokens = (~decode).repeat_interleave(query_lens.long(), output_size=num_tokens).nonzero().squeeze(1)
    pre_lens = query_lens[pre_seqs]
    pre_starts = torch.cat([pre_lens.new_zeros(1), pre_lens.cumsum(0)])
    out[pre_tokens] = _attend_prefill(q[pre_tokens], k[pre_tokens], v[pre_tokens], k_cache, v_cache,
                                      block_tables[pre_seqs], seq_lens[pre_seqs], pre_starts, *args)
    return out


def _attend_prefill(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
    query_start_loc: Tensor, scale: float, window: int, softcap: float,
) -> Tensor:
    """Prefill chunks. A sequence with no cached context (a fresh prompt, the common case) has this step's own
    k/v as its keys: causal SDPA per sequence, with no cache gather, no padding and no mask tensor. The others
    (continued chunks, prefix-cache hits) take the padded formulation over the cache, as do windows,
    soft-capping, and callers such as the quantized-cache op that pass no k/v and attend over what they wrote."""
    args = (scale, window, softcap)
    if window > 0 or softcap > 0.0 or k.shape[0] != q.shape[0]:
        return _attend_padded(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *args)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    continued = []
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        if lens[i] != b - a:
            continued.append(i)
            continue
        # [1, H, L, D] with a batch dim: torch's CPU flash kernel (3-D inputs take the slower math path).
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2).to(q.dtype),
            v[None, a:b].transpose(1, 2).to(q.dtype), is_causal=True, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1])[0].transpose(0, 1)
    if continued:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=q.device) for i in continued])
        sizes = torch.tensor([0] + [starts[i + 1] - starts[i] for i in continued], device=q.device)
        seqs = torch.tensor(continued, device=q.device)
        out[rows] = _attend_padded(q[rows], k_cache, v_cache, block_tables[seqs], seq_lens[seqs],
                                   sizes.cumsum(0).to(query_start_loc.dtype), *args)
    return out


paged_attention_op = torch.library.custom_op(
    "kiln::paged_attention", paged_attention, mutates_args=("k_cache", "v_cache"))


def _attend_padded(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
    scale: float, window: int, softcap: float,
) -> Tensor:
    """Attention in torch: gather each sequence's context, pad queries per sequence, mask by position."""
    num_tokens, num_heads, _ = q.shape
    _, block_size, kv_heads, head_dim = k_cache.shape
    v_dim = v_cache.shape[-1]
    seq_id, row, _, max_q = _token_layout(query_start_loc, seq_lens, num_tokens)
    num_seqs = seq_lens.numel()
    # Only gather as many blocks as the longest context needs.
    max_blocks = (int(seq_lens.max()) + block_size - 1) // block_size
    tables = block_tables[:, :max_blocks].long()
    ctx = max_blocks * block_size
    keys = k_cache[tables].view(num_seqs, ctx, kv_heads, head_dim).transpose(1, 2)
    values = v_cache[tables].view(num_seqs, ctx, kv_heads, v_dim).transpose(1, 2)

    # Queries padded per sequence: [S, Hq, max_q, D]; padded rows are computed and dropped.
    padded = q.new_zeros(num_seqs, max_q, num_heads, q.shape[-1])
    padded[seq_id, row] = q
    padded = padded.transpose(1, 2)

    context_lens = (seq_lens.long() - (query_start_loc[1:] - query_start_loc[:-1]).long())
    q_pos = context_lens[:, None] + torch.arange(max_q, device=q.device)[None, :]  # [S, max_q]
    k_pos = torch.arange(ctx, device=q.device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if window > 0:
        allowed &= (q_pos[:, :, None] - k_pos[None, None, :]) < window
    allowed = allowed[:, None]  # broadcast over heads

    keys = keys.to(q.dtype)
    values = values.to(q.dtype)
    if softcap > 0:
        group = num_heads // kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.matmul(padded, keys.transpose(-1, -2)).float() * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            padded, keys, values, attn_mask=allowed, scale=scale, enable_gqa=kv_heads != num_heads
        )
    return out.transpose(1, 2)[seq_id, row]


@paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, window, softcap):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


def reference_calls() -> dict[Any, Callable[..., Any]]:
    """What backend "reference" calls in place of each graph target: every kiln op's defining function (the
    same code without the dispatcher's round trip, about 10 us a call, as much as a fused op's whole work at
    decode sizes), and for `aten.linear` kiln's CPU linear (a C loop for small-batch decode, else torch)."""
    from torch._library.custom_ops import OPDEFS

    from . import cpu_kernels, fused_ops, quant_ops  # noqa: F401  (declares their ops)

    found: dict[Any, Callable[..., Any]] = {torch.ops.aten.linear.default: cpu_kernels.linear}
    for name, opdef in OPDEFS.items():
        fn = opdef._init_fn
        if name.startswith("kiln::") and getattr(importlib.import_module(fn.__module__), fn.__qualname__, None) is fn:
            found[getattr(torch.ops.kiln, name.removeprefix("kiln::")).default] = fn
    return found

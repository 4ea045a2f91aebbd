"""`kiln::paged_attention`: the attention op of kiln's IR, with its pure-torch reference and its fake.

The reference is the specification every backend is tested against: vectorised over the whole packed batch
(no per-sequence Python loops), written in torch only. Backend "reference" runs it directly, or on CPU the C
kernels that backends/cpu/lowering.py chooses for it where they apply.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    _, _, kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, v_cache.shape[-1]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
    return attend_padded(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window, softcap)


paged_attention_op = torch.library.custom_op(
    "kiln::paged_attention", paged_attention, mutates_args=("k_cache", "v_cache")
)


def attend_padded(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
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

    context_lens = seq_lens.long() - (query_start_loc[1:] - query_start_loc[:-1]).long()
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

"""kiln::paged_attention against a naive per-sequence attention: its pure-torch reference and the CPU backend's
C-kernel paths (backends/cpu/lowering.py)."""

from __future__ import annotations

import pytest
import torch

from kiln.backends.cpu import kernels, lowering
from kiln.ops import attention
from kiln.ops.metadata import AttentionMetadata


def _naive(q, keys, values, start, scale, window, softcap):
    """One sequence: queries at positions start.. attend over keys[0..pos] (and the window)."""
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    kpos = torch.arange(keys.shape[0])[None, :]
    allowed = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("use_c", [True, False])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 0.0), (0, 4.0)])
@pytest.mark.parametrize(
    "prompt_lens,mixed",
    [([9, 1, 14], [1, 4, 1]), ([9, 1, 24], [1, 19, 1])],
    ids=["short", "long"],  # short: every query <= SHORT_QUERY, so tokens attend as decode rows
)
def test_paged_attention_ragged_prefill_then_decode(use_c, window, softcap, prompt_lens, mixed):
    if use_c and kernels._library() is None:
        pytest.skip("no C compiler on this machine: the C decode path cannot be built")
    attend = lowering.paged_attention if use_c else attention.paged_attention
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    cached = [0, 0, 5]  # the third sequence already holds 5 cached tokens
    # mixed: a step where the second sequence prefills a chunk while the others decode
    total = [c + p + m + 3 for c, p, m in zip(cached, prompt_lens, mixed)]  # + 3 decode steps
    keys = [torch.randn(n, kv_heads, dim, generator=gen) for n in total]
    values = [torch.randn(n, kv_heads, dim, generator=gen) for n in total]
    # Blocks interleaved across sequences (and block 0 unused), never contiguous within one sequence.
    tables = [[1 + s + b * len(total) for b in range(-(-n // block))] for s, n in enumerate(total)]
    num_blocks = max(max(t) for t in tables) + 1
    k_cache = torch.zeros(num_blocks, block, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)

    def step(query_lens, context_lens):
        meta = AttentionMetadata.build(query_lens, context_lens, tables, block)
        sl = lambda xs: torch.cat([x[c : c + n] for x, c, n in zip(xs, context_lens, query_lens)])  # noqa: E731
        q = torch.randn(sum(query_lens), heads, dim, generator=gen)
        out = attend(
            q,
            sl(keys),
            sl(values),
            k_cache,
            v_cache,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            0.3,
            window,
            softcap,
        )
        starts = meta.query_start_loc.tolist()
        for s, (c, n) in enumerate(zip(context_lens, query_lens)):
            expect = _naive(q[starts[s] : starts[s + 1]], keys[s][: c + n], values[s][: c + n], c, 0.3, window, softcap)
            torch.testing.assert_close(out[starts[s] : starts[s + 1]], expect, rtol=1e-5, atol=1e-5)

    # Pre-fill the cached prefix of sequence 2 alone, then a mixed prefill, then pure decode steps.
    meta = AttentionMetadata.build([5], [0], [tables[2]], block)
    attend(
        torch.randn(5, heads, dim),
        keys[2][:5],
        values[2][:5],
        k_cache,
        v_cache,
        meta.slot_mapping,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        0.3,
        window,
        softcap,
    )
    step(prompt_lens, cached)
    done = [c + p for c, p in zip(cached, prompt_lens)]
    step(mixed, done)
    for i in range(3):
        step([1, 1, 1], [d + m + i for d, m in zip(done, mixed)])


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fresh_prompts_attend_over_their_own_keys(kv_heads):
    """No cached context: the per-sequence causal SDPA path (mixed with a decode row, which reads the cache)."""
    gen = torch.Generator().manual_seed(kv_heads)
    heads, dim, block, lens = 4, 8, 4, [9, 2, 14]
    tables = [[1 + s + b * 3 for b in range(4)] for s in range(3)]
    k_cache = torch.zeros(16, block, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    keys = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    values = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    first = AttentionMetadata.build([1], [0], [tables[1]], block)  # sequence 1's first token, cached before
    lowering.paged_attention(
        torch.randn(1, heads, dim),
        keys[1][:1],
        values[1][:1],
        k_cache,
        v_cache,
        first.slot_mapping,
        first.block_tables,
        first.seq_lens,
        first.query_start_loc,
        0.3,
        0,
        0.0,
    )
    for query_lens, context in [([9, 1, 14], [0, 1, 0]), ([9, 14], None)]:  # with and without a decode row
        seqs = [0, 1, 2] if context else [0, 2]
        context = context or [0, 0]
        meta = AttentionMetadata.build(query_lens, context, [tables[s] for s in seqs], block)
        q = torch.randn(sum(query_lens), heads, dim, generator=gen)
        rows = list(zip(seqs, context, query_lens))

        def pick(xs: list[torch.Tensor], rows: list = rows) -> torch.Tensor:
            return torch.cat([xs[s][c : c + n] for s, c, n in rows])

        out = lowering.paged_attention(
            q,
            pick(keys),
            pick(values),
            k_cache,
            v_cache,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            0.3,
            0,
            0.0,
        )
        starts = meta.query_start_loc.tolist()
        for i, (s, c, n) in enumerate(zip(seqs, context, query_lens)):
            expect = _naive(q[starts[i] : starts[i + 1]], keys[s][: c + n], values[s][: c + n], c, 0.3, 0, 0.0)
            torch.testing.assert_close(out[starts[i] : starts[i + 1]], expect, rtol=1e-5, atol=1e-5)


def test_fresh_and_continued_prefill_in_one_step():
    """A chunk continuing a sequence beside fresh prompts: each takes its own path, both exact."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, block, lens = 4, 2, 8, 4, [6, 11, 3]
    tables = [[1 + s + b * 3 for b in range(4)] for s in range(3)]
    k_cache = torch.zeros(16, block, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    keys = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    values = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    first = AttentionMetadata.build([5], [0], [tables[1]], block)  # sequence 1's first chunk, 5 tokens
    lowering.paged_attention(
        torch.randn(5, heads, dim),
        keys[1][:5],
        values[1][:5],
        k_cache,
        v_cache,
        first.slot_mapping,
        first.block_tables,
        first.seq_lens,
        first.query_start_loc,
        0.3,
        0,
        0.0,
    )
    query_lens, context = [6, 6, 3], [0, 5, 0]
    meta = AttentionMetadata.build(query_lens, context, tables, block)
    q = torch.randn(sum(query_lens), heads, dim, generator=gen)
    pick = lambda xs: torch.cat([x[c : c + n] for x, c, n in zip(xs, context, query_lens)])  # noqa: E731
    out = lowering.paged_attention(
        q,
        pick(keys),
        pick(values),
        k_cache,
        v_cache,
        meta.slot_mapping,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        0.3,
        0,
        0.0,
    )
    starts = meta.query_start_loc.tolist()
    for s, (c, n) in enumerate(zip(context, query_lens)):
        expect = _naive(q[starts[s] : starts[s + 1]], keys[s][: c + n], values[s][: c + n], c, 0.3, 0, 0.0)
        torch.testing.assert_close(out[starts[s] : starts[s + 1]], expect, rtol=1e-5, atol=1e-5)

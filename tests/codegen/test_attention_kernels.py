"""The paged-cache write and the varlen paged attention kernel against kiln::paged_attention's reference:
a ragged batch mixing fresh prefill, prefill over a cached prefix and decode, with GQA, sliding window,
soft-capping and the split-KV merge; outputs NaN-poisoned, block tables interleaved across sequences."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import DEVICE, assert_close, poisoned, randn

import kiln.ops  # noqa: F401  (declares the kiln::paged_attention reference)
from kiln.codegen.kernel_plan import Config, run
from kiln.codegen.kernels import cache_write_plan as cache_write
from kiln.codegen.kernels import paged_attention_plan as attn
from kiln.ops.metadata import AttentionMetadata

BLOCK_SIZE, KV_HEADS, GROUP, HEAD_DIM = 8, 2, 2, 32


def _batch(query_lens: list[int], context_lens: list[int], dtype: torch.dtype):
    """Random q/k/v for the step, caches holding random earlier context, and the step's metadata."""
    per_seq = max(-(-(q + c) // BLOCK_SIZE) for q, c in zip(query_lens, context_lens))
    n = len(query_lens)
    tables = [[b * n + s + 1 for b in range(per_seq)] for s in range(n)]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, device=DEVICE)
    tokens = sum(query_lens)
    q = randn(tokens, KV_HEADS * GROUP, HEAD_DIM, dtype=dtype)
    k, v = randn(tokens, KV_HEADS, HEAD_DIM, dtype=dtype), randn(tokens, KV_HEADS, HEAD_DIM, dtype=dtype)
    caches = [randn(per_seq * n + 1, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype) for _ in range(2)]
    return q, k, v, caches, meta


def _check(query_lens, context_lens, dtype, window=0, softcap=0.0, splits=1, config: Config | None = None) -> None:
    q, k, v, (k_cache, v_cache), meta = _batch(query_lens, context_lens, dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    scale = HEAD_DIM**-0.5
    expected = torch.ops.kiln.paged_attention(
        q,
        k,
        v,
        ref_k,
        ref_v,
        meta.slot_mapping,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale,
        window,
        softcap,
    )
    run(cache_write.plan(k, v, k_cache, v_cache, meta.slot_mapping))
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    tokens, heads, _ = q.shape
    out = poisoned(tokens, heads, HEAD_DIM, dtype=dtype)
    partial, lse = poisoned(tokens, heads, splits, HEAD_DIM), poisoned(tokens, heads, splits)
    config = config or attn.configs(max(query_lens), GROUP, HEAD_DIM, HEAD_DIM, dtype)[0]
    for launch in attn.plan(
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale,
        window,
        softcap,
        max(query_lens),
        config,
        splits,
        partial,
        lse,
    ):
        run(launch)
    assert_close(out, expected)


def test_cache_write_skips_padding_slots() -> None:
    k, v = randn(3, KV_HEADS, HEAD_DIM), randn(3, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = poisoned(4, BLOCK_SIZE, KV_HEADS, HEAD_DIM), poisoned(4, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    run(cache_write.plan(k, v, k_cache, v_cache, torch.tensor([9, -1, 30], device=DEVICE)))
    flat_k, flat_v = k_cache.view(-1, KV_HEADS, HEAD_DIM), v_cache.view(-1, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat_k[[9, 30]], k[[0, 2]]) and torch.equal(flat_v[[9, 30]], v[[0, 2]])
    assert int(flat_k.isnan().all(-1).all(-1).sum()) == 4 * BLOCK_SIZE - 2  # nothing else written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_prefill_prefix_and_decode(dtype: torch.dtype) -> None:
    # Fresh prompt; prompt over a cached prefix; decode; decode at a block boundary; with the shape's config
    # and with small tiles, so that prompts span several query tiles and keys several pages per tile.
    _check([21, 5, 1, 1], [0, 11, 30, 15], dtype)
    _check([21, 5, 1, 1], [0, 11, 30, 15], dtype, config=Config({"BLOCK_Q": 8, "BLOCK_M": 16, "BLOCK_N": 16}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sliding_window_and_softcap(dtype: torch.dtype) -> None:
    _check([21, 5, 1], [0, 11, 70], dtype, window=6)
    _check([21, 5, 1], [0, 11, 70], dtype, softcap=5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_decode_merge(dtype: torch.dtype) -> None:
    # Contexts shorter than the split count leave empty splits, which the merge must ignore.
    _check([1, 1, 1], [150, 2, 63], dtype, splits=4)
    _check([1, 1], [150, 40], dtype, window=20, splits=4)

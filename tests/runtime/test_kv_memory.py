"""Sizing the KV pool: explicit counts and budgets, the GPU budget's arithmetic, the profiled worst-case step."""

from __future__ import annotations

import pytest
from runtime_fakes import FakeModel

import kiln
from kiln.runtime.kv_memory import GIB, kv_budget, profile_batch, run_profile_step, size_kv_pool

VOCAB = 64


def _size(model: FakeModel, **overrides: object) -> object:
    options = dict(
        block_size=4,
        max_model_len=model.max_model_len,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        num_kv_blocks=None,
        kv_cache_memory=None,
        gpu_memory_utilization=0.9,
    )
    return size_kv_pool(model, **{**options, **overrides})


def test_explicit_count_and_budget() -> None:
    model = FakeModel(VOCAB, max_model_len=32)
    per_block = model.kv_cache_bytes_per_block(4)
    assert _size(model, num_kv_blocks=5).num_blocks == 5
    pool = _size(model, kv_cache_memory=per_block * 20 + 3)
    assert (pool.num_blocks, pool.tokens, pool.bytes) == (20, 80, 20 * per_block)
    assert "20 blocks x 4 tokens = 80 tokens" in pool.describe()


def test_a_budget_below_one_full_sequence_is_refused_with_what_it_needs() -> None:
    model = FakeModel(VOCAB, max_model_len=32)
    needed = 8 * model.kv_cache_bytes_per_block(4)  # 32 tokens = 8 blocks of 4
    with pytest.raises(ValueError, match=f"kv_cache_memory .* needs {needed} bytes"):
        _size(model, kv_cache_memory=needed - 1)
    assert _size(model, kv_cache_memory=needed).num_blocks == 8


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "0.9"])
def test_gpu_memory_utilization_is_validated(value: object) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        _size(FakeModel(VOCAB), gpu_memory_utilization=value)


def test_cpu_default_is_room_for_max_num_seqs_sequences() -> None:
    pool = _size(FakeModel(VOCAB, max_model_len=40), max_num_seqs=3)
    assert pool.num_blocks == 30 and "CPU default" in pool.source


def test_gpu_budget_arithmetic() -> None:
    total = 80 * int(GIB)
    # 0.9 of 80 GiB, less 10 GiB of weights and activations, less 1 GiB of CUDA context: 61 GiB.
    assert kv_budget(total, 0.9, 10 * int(GIB), int(GIB)) == 61 * int(GIB)


def test_profile_batch_fills_the_step() -> None:
    lengths, tables, blocks = profile_batch(
        max_num_batched_tokens=2048, max_num_seqs=256, block_size=16, max_model_len=4096
    )
    assert len(lengths) == 256 and sum(lengths) == 2048 and max(lengths) - min(lengths) <= 1
    assert blocks == sum(len(t) for t in tables) == 256
    assert sorted(b for t in tables for b in t) == list(range(blocks))  # no block shared
    lengths, _, _ = profile_batch(max_num_batched_tokens=100, max_num_seqs=2, block_size=16, max_model_len=30)
    assert lengths == [30, 30]  # a sequence never exceeds max_model_len


def test_profile_step_runs_the_compiled_model(checkpoint) -> None:
    compiled = kiln.compile(str(checkpoint("llama")), device="cpu")
    logits, cache_bytes = run_profile_step(
        compiled, max_num_batched_tokens=40, max_num_seqs=3, block_size=8, max_model_len=64
    )
    assert tuple(logits.shape) == (3, compiled.vocab_size)
    assert cache_bytes == compiled.kv_cache_bytes_per_block(8) * 6  # 14 + 13 + 13 tokens: 2 blocks each


def test_stats_report_the_pool_in_blocks_tokens_and_gib() -> None:
    model = FakeModel(VOCAB)
    stats = kiln.LLM(model, num_kv_blocks=10, block_size=4).stats()
    per_block = model.kv_cache_bytes_per_block(4)
    assert (stats["kv_blocks_total"], stats["kv_cache_tokens"], stats["kv_cache_bytes"]) == (10, 40, 10 * per_block)
    assert stats["kv_cache_gib"] == round(10 * per_block / GIB, 4)

"""Block pool: reference counts, prefix-cache hits, LRU eviction, and invariants under random use."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.block_manager import BlockManager, hash_block
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Request


def make_seq(tokens: list[int], rid: str = "r"):
    return Request(rid, None, tokens, SamplingParams(), 0.0).seqs[0]


def run_prefill(bm: BlockManager, seq) -> int:
    """Admit seq as the scheduler does (cache lookup + allocate) and mark it computed; returns hit tokens."""
    hits = bm.find_cached_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens - len(hits) * bm.block_size, hits)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    return len(hits) * bm.block_size


def test_hash_chain_depends_on_parent_and_is_stable() -> None:
    a = hash_block(b"root", [1, 2, 3])
    assert a == hash_block(b"root", [1, 2, 3])
    assert a != hash_block(b"other", [1, 2, 3])
    assert a != hash_block(b"root", [1, 2, 4])
    assert len(a) == 32  # SHA-256


def test_prefix_reuse_and_refcounts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(10)), "a")
    assert run_prefill(bm, first) == 0
    second = make_seq(list(range(8)) + [99, 98, 97], "b")
    assert run_prefill(bm, second) == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert bm.ref_counts[first.block_table[0]] == 2
    bm.free(first)
    bm.free(second)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8


def test_full_hit_still_computes_the_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, make_seq(list(range(8)), "a"))
    again = make_seq(list(range(8)), "b")
    assert run_prefill(bm, again) == 4  # the last block is recomputed so that logits exist


def test_cached_blocks_survive_until_the_pool_runs_out_then_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3], "old")  # one full block cached
    run_prefill(bm, old)
    bm.free(old)
    newer = make_seq([5, 6, 7], "new")
    run_prefill(bm, newer)
    bm.free(newer)
    # Two plain free blocks remain; taking them must not evict either cached block.
    filler = make_seq([9, 9, 9], "fill")
    assert bm.allocate(filler, 3)
    assert len(bm.cached) == 2
    # One more block: evicts the least recently freed cached block ("old"'s).
    extra = make_seq([8, 8], "extra")
    assert bm.allocate(extra, 1)
    assert bm.find_cached_prefix(make_seq([1, 2, 3])) == []
    assert len(bm.find_cached_prefix(make_seq([5, 6, 7]))) == 1


def test_allocate_fails_without_side_effects() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "grow", "free"]),
            st.integers(0, 7),
            st.lists(st.integers(0, 3), min_size=1, max_size=12),
        ),
        max_size=40,
    )
)
def test_random_use_keeps_the_pool_consistent(ops) -> None:
    bm = BlockManager(num_blocks=10, block_size=3)
    live: dict[int, object] = {}
    for op, slot, tokens in ops:
        if op == "add" and slot not in live:
            seq = make_seq(tokens)
            hits = bm.find_cached_prefix(seq)
            if bm.allocate(seq, seq.num_tokens - len(hits) * 3, hits):
                seq.num_computed_tokens = seq.num_tokens
                bm.commit(seq)
                live[slot] = seq
        elif op == "grow" and slot in live:
            seq = live[slot]
            seq.token_ids.extend(tokens[:2])
            if bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens):
                seq.num_computed_tokens = seq.num_tokens
                bm.commit(seq)
            else:
                del seq.token_ids[seq.num_computed_tokens :]
        elif op == "free" and slot in live:
            bm.free(live.pop(slot))
        holders = [0] * bm.num_blocks
        for seq in live.values():
            for block in seq.block_table:
                holders[block] += 1
        assert holders == bm.ref_counts
        assert bm.num_used_blocks == sum(1 for h in holders if h)
        for block_hash, block in bm.cached.items():
            assert bm.block_hash[block] == block_hash
    for seq in live.values():
        bm.free(seq)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks

"""Scheduler invariants under random traffic: budgets hold, blocks are never double-owned, nothing leaks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_fakes import FakeModel, check_invariants, reference_greedy

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test with async scheduling off and on

VOCAB = 32

request_st = st.tuples(
    st.lists(st.integers(0, 7), min_size=1, max_size=40),  # small alphabet: many shared prefixes
    st.integers(1, 12),  # max_tokens
    st.integers(1, 3),  # n
)
op_st = st.one_of(
    st.tuples(st.just("add"), request_st),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(op_st, min_size=1, max_size=30),
    num_blocks=st.integers(14, 40),
    block_size=st.sampled_from([2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    max_batched=st.integers(8, 64),
    prefix_caching=st.booleans(),
    chunked=st.booleans(),
)
def test_random_traffic_keeps_invariants(
    ops, num_blocks, block_size, max_num_seqs, max_batched, prefix_caching, chunked
) -> None:
    max_model_len = 56
    if not chunked:
        max_batched = max(max_batched, max_model_len)
    engine = LLMEngine(
        FakeModel(VOCAB, max_model_len=max_model_len),
        num_kv_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched,
        enable_prefix_caching=prefix_caching,
        enable_chunked_prefill=chunked,
    )
    schedule = engine.scheduler.schedule

    def checked_schedule():
        out = schedule()
        assert out.num_batched_tokens <= max_batched
        assert len(out.seqs) <= max_num_seqs
        assert len({s.seq_id for s in out.seqs}) == len(out.seqs)
        assert all(n >= 1 for n in out.num_new_tokens)
        return out

    engine.scheduler.schedule = checked_schedule
    added: dict[str, tuple[list[int], int, int]] = {}
    finished = {}
    aborted = set()

    def run_step():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        check_invariants(engine)

    for op, arg in ops:
        if op == "add":
            prompt, max_tokens, n = arg
            rid = f"r{len(added)}"
            try:
                engine.add_request(
                    rid, prompt, SamplingParams(n=n, max_tokens=max_tokens, temperature=0, ignore_eos=True)
                )
            except ValueError:
                assert (
                    len(prompt) + max_tokens > max_model_len
                    or -(-(len(prompt) + max_tokens - 1) // block_size) > num_blocks
                )
                continue
            added[rid] = (prompt, max_tokens, n)
        elif op == "step":
            for _ in range(arg):
                run_step()
        else:
            rid = f"r{arg}"
            if rid in added and rid not in finished:
                aborted.add(rid)
            engine.abort(rid)
            check_invariants(engine)
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        run_step()
    assert not engine.has_unfinished_requests(), "the engine stopped making progress"
    assert engine.stats()["kv_blocks_in_use"] == 0
    assert set(finished) == set(added) - aborted
    for rid, out in finished.items():
        prompt, max_tokens, n = added[rid]
        expected = reference_greedy(prompt, max_tokens, VOCAB)
        assert [c.token_ids for c in out.outputs] == [expected] * n

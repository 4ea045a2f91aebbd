"""Async scheduling: step N+1 is launched before step N's tokens reach the host, and nothing else changes.

The fake model checks every context it reads back from the paged cache, so a placeholder that reached the
model instead of its token, or a block reused while a step still writes it, changes the tokens.
"""

from __future__ import annotations

import random

from runtime_fakes import CharTokenizer, FakeModel, check_invariants, reference_greedy

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

VOCAB = 64


def _run(engine: LLMEngine, requests: list[tuple[str, list[int] | str, SamplingParams]]) -> dict:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert all(t >= 0 for c in out.outputs for t in c.token_ids), "a placeholder leaked into an output"
            if out.finished:
                finished[out.request_id] = out
                held = [s for s in engine.scheduler.running if s.request.request_id == out.request_id]
                assert not held, "a finished request still holds its sequences"
        check_invariants(engine)
    assert engine.stats()["kv_blocks_in_use"] == 0
    return finished


def test_steps_overlap_and_report_one_step_late() -> None:
    engine = LLMEngine(FakeModel(VOCAB), num_kv_blocks=64, block_size=4, async_scheduling=True)
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.step() == []  # the prefill is launched; its token is reported by the next call
    assert engine.in_flight is not None
    first = engine.step()
    assert [o.outputs[0].token_ids for o in first] == [reference_greedy([1, 2, 3], 1, VOCAB)]
    seq = engine.requests["a"].seqs[0]
    assert seq.num_pending == 1 and seq.token_ids[-1] < 0  # the second token is being sampled
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.token_ids[3:] == reference_greedy([1, 2, 3], 3, VOCAB) and seq.num_pending == 0


def test_mixed_traffic_matches_the_synchronous_engine() -> None:
    """EOS, stop tokens, stop strings, min_tokens, max_tokens, n > 1, penalties, seeds and logprobs: the same
    tokens, texts and finish reasons, and every block back, with and without overlap."""
    tok = CharTokenizer()
    free_run = reference_greedy(tok.encode("the cat"), 30, tok.vocab_size)
    eos = free_run[5]
    rng = random.Random(3)
    kinds = [
        dict(temperature=0),
        dict(temperature=0, min_tokens=8),
        dict(temperature=0, stop=["a", "e", "i", "o"]),
        dict(temperature=0, stop_token_ids=[free_run[3]]),
        dict(temperature=0, ignore_eos=True),
        dict(temperature=0.8, seed=5, n=2),
        dict(temperature=0, presence_penalty=1.5, ignore_eos=True),
        dict(temperature=1.0, seed=1, logprobs=2, top_k=5),
    ]
    requests = []
    for i in range(24):
        prompt = "the cat" if i % 3 == 0 else "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 12)))
        requests.append((f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(10, 20), **kinds[i % len(kinds)])))
    results = []
    for overlap in (False, True):
        engine = LLMEngine(
            FakeModel(tok.vocab_size, tokenizer=tok, eos_token_ids=[eos]),
            num_kv_blocks=40,
            block_size=4,
            max_num_seqs=6,
            max_num_batched_tokens=24,
            async_scheduling=overlap,
        )
        done = _run(engine, requests)
        results.append(
            {
                rid: [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in out.outputs]
                for rid, out in done.items()
            }
        )
    assert results[0] == results[1]
    reasons = {(c[2], type(c[3])) for outs in results[0].values() for c in outs}
    assert reasons == {("length", type(None)), ("stop", type(None)), ("stop", int), ("stop", str)}


def test_abort_while_a_step_is_in_flight() -> None:
    engine = LLMEngine(FakeModel(VOCAB), num_kv_blocks=32, block_size=4, async_scheduling=True)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.add_request("b", [8, 9], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort("a")
    check_invariants(engine)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert set(outputs) == {"b"} and outputs["b"].outputs[0].token_ids == reference_greedy([8, 9], 10, VOCAB)
    assert engine.stats()["kv_blocks_in_use"] == 0

"""Sampler: greedy fast path, filters, penalties, logprobs, and seeds that ignore batch composition."""
from __future__ import annotations

import math
import random

import torch

from kiln.runtime.llm import LLM
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Request
from runtime_fakes import FakeModel

VOCAB = 64


def seqs_for(params: list[SamplingParams], outputs: list[list[int]] | None = None):
    seqs = []
    for i, p in enumerate(params):
        seq = Request(f"r{i}", None, [1, 2, 3], p, 0.0).seqs[0]
        seq.token_ids.extend((outputs or [[]] * len(params))[i])
        seqs.append(seq)
    return seqs


def test_seeded_requests_ignore_what_else_is_in_the_batch() -> None:
    target = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5]
    alone = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4).generate(prompt, target)[0]
    rng = random.Random(0)
    others = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    other_params = [SamplingParams(temperature=0.8, max_tokens=rng.randint(1, 25), ignore_eos=True, top_k=5),
                    SamplingParams(temperature=0, max_tokens=9), SamplingParams(temperature=2.0, seed=7),
                    SamplingParams(temperature=1.0, max_tokens=30, presence_penalty=1.0),
                    SamplingParams(temperature=0.5, min_p=0.2, logprobs=2), SamplingParams(n=3, max_tokens=4)]
    mixed = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4, max_num_batched_tokens=24)
    outs = mixed.generate(others[:3] + [prompt] + others[3:], other_params[:3] + [target] + other_params[3:])
    assert outs[3].outputs[0].token_ids == alone.outputs[0].token_ids
    different_seed = SamplingParams(temperature=1.3, top_p=0.9, max_tokens=20, seed=99, ignore_eos=True)
    again = LLM(FakeModel(VOCAB), num_kv_blocks=128, block_size=4).generate(prompt, different_seed)[0]
    assert again.outputs[0].token_ids != alone.outputs[0].token_ids


def test_all_greedy_batch_is_one_argmax() -> None:
    logits = torch.randn(5, VOCAB)
    out = Sampler([])(logits, seqs_for([SamplingParams(temperature=0)] * 5))
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None


def test_degenerate_filters_equal_greedy() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
              SamplingParams(temperature=1e-3, seed=1), SamplingParams(top_k=1, temperature=50.0),
              SamplingParams(temperature=0)]
    assert Sampler([])(logits, seqs_for(params)).token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_keep_sampling_inside_the_allowed_set() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]] * 400)
    probs = torch.softmax(logits[0], -1)
    sampler = Sampler([])
    top_k = sampler(logits, seqs_for([SamplingParams(top_k=2)] * 400)).token_ids
    assert set(top_k) == {0, 1}
    # top_p = p0 + tiny: the nucleus is tokens 0 and 1 (the token crossing p is kept).
    top_p = sampler(logits, seqs_for([SamplingParams(top_p=float(probs[0]) + 1e-3)] * 400)).token_ids
    assert set(top_p) == {0, 1}
    min_p = sampler(logits, seqs_for([SamplingParams(min_p=float(probs[2] / probs[0]) - 1e-4)] * 400)).token_ids
    assert set(min_p) == {0, 1, 2}


def test_temperature_sampling_follows_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]]).repeat(4000, 1)
    tokens = Sampler([])(logits, seqs_for([SamplingParams(temperature=2.0)] * 4000)).token_ids
    expected = torch.softmax(logits[0] / 2.0, -1)
    for t in range(4):
        freq = tokens.count(t) / len(tokens)
        assert abs(freq - float(expected[t])) < 0.03


def test_penalties_push_away_repeated_tokens() -> None:
    logits = torch.zeros(4, VOCAB)
    logits[:, 10] = 1.0
    logits[:, 11] = 0.8
    history = [[10, 10, 10]] * 4
    params = [SamplingParams(temperature=0, presence_penalty=0.5),
              SamplingParams(temperature=0, frequency_penalty=0.1),
              SamplingParams(temperature=0, repetition_penalty=2.0),
              SamplingParams(temperature=0, frequency_penalty=0.05)]
    # 1 - 0.5, 1 - 3*0.1, 1 / 2 all drop below 0.8; 1 - 3*0.05 = 0.85 stays above.
    assert Sampler([])(logits, seqs_for(params, history)).token_ids == [11, 11, 11, 10]


def test_repetition_penalty_counts_prompt_tokens_and_negative_logits() -> None:
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 2] = -1.0  # token 2 is in the prompt [1, 2, 3]
    logits[0, 40] = -1.5
    out = Sampler([])(logits, seqs_for([SamplingParams(temperature=0, repetition_penalty=2.0)]))
    assert out.token_ids == [40]  # -1.0 * 2 = -2.0 < -1.5


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 3.0
    logits[:, 6] = 2.0
    logits[:, 7] = 1.0
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6]),
              SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)]
    assert Sampler([5])(logits, seqs_for(params)).token_ids == [7, 5]
    assert Sampler([5])(logits, seqs_for(params, [[9, 9], [9, 9]])).token_ids == [5, 5]


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.7, logprobs=0, seed=5)]
    out = Sampler([])(logits, seqs_for(params))
    reference = torch.log_softmax(logits, -1)
    chosen, top = out.logprobs[0]
    assert len(top) == 3 and out.token_ids[0] in top
    assert set(top) == set(reference[0].topk(3).indices.tolist())
    assert math.isclose(chosen, float(reference[0, out.token_ids[0]]), rel_tol=1e-5)
    chosen, top = out.logprobs[1]
    assert list(top) == [out.token_ids[1]] and math.isclose(chosen, float(reference[1, out.token_ids[1]]),
                                                            rel_tol=1e-5)


def test_cumulative_logprob_sums_token_logprobs() -> None:
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=64, block_size=4)
    out = llm.generate([5, 6], SamplingParams(temperature=0.9, seed=0, max_tokens=6, logprobs=2,
                                              ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 6
    total = sum(step[token] for step, token in zip(out.logprobs, out.token_ids))
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)
    plain = llm.generate([5, 6], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None

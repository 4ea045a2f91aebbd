"""Speculative sampling draws from the target's distribution: chi-square goodness of fit, vocabulary of 8.

The fake model here is a Markov chain (next-token logits depend on the last token only), so the exact law of
any run of outputs is a product of per-step distributions computed in float64 from the definitions
(temperature, top-k / top-p / min-p renormalised; test_sampler_distributions' helpers). The prompt shows every
token, so n-gram lookup proposes at every verifying step and both branches of the rejection sampler (accept, and draw
from the residual) run. Unseeded draws come from torch's default generator, seeded here: deterministic.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from runtime_fakes import FakeModel, markov_logits
from test_sampler_distributions import assert_fits, nucleus, renormalised, softmax

from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

VOCAB = 8
# Every token's latest occurrence is followed by its likeliest successor: 1-gram lookup proposes well.
PROMPT = [0, 0, 2, 2, 5, 6, 4, 1, 6, 3, 7, 7]
NUM_SEQS = 2000


def step_law(last: int, params: SamplingParams) -> list[float]:
    """The sampler's distribution of the token after `last`."""
    logits = [float(x) for x in markov_logits([last], VOCAB)]
    probs = softmax(logits, params.temperature)
    keep = set(range(VOCAB))
    if params.top_k > 0:
        keep = set(sorted(range(VOCAB), key=lambda i: -probs[i])[: params.top_k])
        probs = renormalised(probs, keep)
    if params.top_p < 1.0:
        keep &= nucleus(probs, params.top_p)
        probs = renormalised(probs, keep)
    if params.min_p > 0.0:
        top = max(probs)
        keep &= {i for i in range(VOCAB) if probs[i] >= params.min_p * top}
    return renormalised(probs, keep)


@pytest.mark.parametrize(
    "options",
    [dict(temperature=1.0, top_p=0.8), dict(temperature=0.7, top_k=5, min_p=0.05)],
    ids=["top_p", "top_k_min_p"],
)
def test_speculative_sampling_matches_the_target_distribution(options: dict) -> None:
    torch.manual_seed(0)
    params = SamplingParams(n=100, max_tokens=3, ignore_eos=True, **options)
    llm = LLM(
        FakeModel(VOCAB, markov=True),
        num_kv_blocks=4096,
        block_size=4,
        max_num_seqs=256,
        max_num_batched_tokens=4096,
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 1},
    )
    outs = llm.generate([PROMPT] * (NUM_SEQS // 100), params)
    runs = [c.token_ids for o in outs for c in o.outputs]
    stats = llm.stats()
    # Both branches ran: proposals accepted and rejected in numbers.
    assert stats["spec_accepted_tokens"] > 300 and stats["spec_draft_tokens"] - stats["spec_accepted_tokens"] > 300
    law = {t: step_law(t, params) for t in range(VOCAB)}
    first = law[PROMPT[-1]]
    # Outputs 2 and 3 (output 2 verified: proposal, or residual draw; output 3 the bonus draw when accepted).
    pairs = [0.0] * VOCAB**2
    for t1, t2, t3 in itertools.product(range(VOCAB), repeat=3):
        pairs[t2 * VOCAB + t3] += first[t1] * law[t1][t2] * law[t2][t3]
    counts = [0] * VOCAB**2
    for run in runs:
        counts[run[1] * VOCAB + run[2]] += 1
    assert_fits(counts, pairs)
    assert math.isclose(sum(pairs), 1.0)

"""Draft-model speculation through compiled tiny Llamas: greedy outputs equal plain decoding, with a draft
that agrees with the target (the target itself: nearly every proposal accepted) and with a smaller one (one
layer: many rejected), under preemption; a draft with another vocabulary is refused."""

from __future__ import annotations

import random

import pytest

import kiln
from kiln.runtime.engine import LLMEngine
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def target(checkpoint):
    return kiln.compile(str(checkpoint("llama")), device="cpu")


def test_draft_model_greedy_equals_plain_decoding(checkpoint, target) -> None:
    rng = random.Random(1)
    prompts = [[rng.randrange(4, target.vocab_size) for _ in range(rng.randint(3, 12))] for _ in range(4)]
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, stop_token_ids=s)
        for m, s in ((12, None), (7, None), (12, [5]), (10, None))
    ]

    def run(spec: dict | None) -> tuple[list, dict]:
        llm = LLM(target, num_kv_blocks=9, block_size=4, max_num_seqs=4, speculative_config=spec)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm.stats()

    plain, plain_stats = run(None)
    assert plain_stats["preemptions"] > 0
    same, stats = run({"method": "draft_model", "model": target, "num_speculative_tokens": 3})
    assert same == plain
    assert stats["spec_acceptance_rate"] > 0.9
    small = str(checkpoint("llama", num_hidden_layers=1))
    smaller, stats = run({"method": "draft_model", "model": small, "num_speculative_tokens": 3})
    assert smaller == plain
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]


def test_draft_with_another_vocabulary_is_refused(checkpoint, target) -> None:
    other = {"method": "draft_model", "model": str(checkpoint("llama", vocab_size=384)), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="speculative_config.model: the draft's vocabulary"):
        LLMEngine(target, num_kv_blocks=8, speculative_config=other)

"""Greedy n-gram and draft-model speculation (a one-layer draft of the same family) through really compiled
tiny models of 6 families: the same tokens, texts and finish reasons as decoding without it, over a mixed batch
(stop strings, stop ids, max_tokens landing inside a proposal) in a KV pool small enough to force preemption.
The prompts repeat a phrase, which random weights often continue, so proposals are made, accepted and
rejected."""

from __future__ import annotations

import random

import pytest

import kiln
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

FAMILIES = ["llama", "qwen2", "mistral", "phi3", "gemma", "gpt_neox"]


def generate(compiled, prompts: list[list[int]], params: list[SamplingParams], spec: dict | None) -> tuple:
    llm = LLM(compiled, num_kv_blocks=8, block_size=4, max_num_seqs=5, speculative_config=spec)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs], llm.stats()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ngram_speculation_equals_plain_decoding(checkpoint, family: str) -> None:
    compiled = kiln.compile(str(checkpoint(family)), device="cpu")
    rng = random.Random(0)
    prompts = [[rng.randrange(4, compiled.vocab_size) for _ in range(rng.randint(3, 6))] * 3 for _ in range(5)]
    free = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)] * 2
    first, _ = generate(compiled, prompts[:2], free, None)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[first[0][1][3:5]]),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[first[1][0][6]]),
        SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0),
    ]
    plain, plain_stats = generate(compiled, prompts, params, None)
    spec, stats = generate(compiled, prompts, params, {"method": "ngram", "num_speculative_tokens": 3})
    assert spec == plain
    assert plain[0][2] == "stop" and plain[1][2] == "stop"
    assert stats["preemptions"] > 0 or plain_stats["preemptions"] > 0
    assert stats["spec_draft_tokens"] > 0
    draft = {
        "method": "draft_model",
        "model": str(checkpoint(family, num_hidden_layers=1)),
        "num_speculative_tokens": 3,
    }
    drafted, stats = generate(compiled, prompts, params, draft)
    assert drafted == plain
    assert stats["spec_draft_tokens"] > 0

"""n-gram speculative decoding over the fake paged model: greedy outputs equal decoding without speculation
(and the reference) under preemption, prefix caching, stops and max_tokens landing mid-proposal; block-pool
invariants hold after every step; stats; config validation."""

from __future__ import annotations

import random

import pytest
from runtime_fakes import CharTokenizer, FakeModel, check_invariants, reference_greedy

from kiln.runtime.engine import LLMEngine
from kiln.runtime.llm import LLM
from kiln.runtime.metrics import ServerMetrics
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative.config import SpeculativeConfig
from kiln.runtime.speculative.proposer import ngram_lookup

pytestmark = pytest.mark.usefixtures("overlap")

VOCAB = 64
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


def run_engine(engine: LLMEngine, prompts: list, params: list[SamplingParams]) -> dict[str, object]:
    """Every request to the end, checking the block pool's invariants after every step."""
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        check_invariants(engine)
    return done


def test_greedy_ngram_equals_the_reference_under_preemption_and_prefix_caching() -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(24)]
    params = [SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0, ignore_eos=True) for _ in prompts]
    engine = LLMEngine(
        FakeModel(VOCAB, markov=True),
        num_kv_blocks=28,
        block_size=4,
        max_num_batched_tokens=40,
        max_num_seqs=12,
        speculative_config=NGRAM,
    )
    launch, mixed = engine.runner.launch, []

    def spy(out):  # a step verifying proposals while another sequence prefills
        prefill = any(n > 1 and i not in out.drafts for i, n in enumerate(out.num_new_tokens))
        mixed.append(bool(out.drafts) and prefill)
        return launch(out)

    engine.runner.launch = spy
    done = run_engine(engine, prompts, params)
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        assert done[str(i)].outputs[0].token_ids == reference_greedy(prompt, sp.max_tokens, VOCAB, markov=True)
    assert any(mixed)
    # Continuations hit the prefix cache on blocks that speculation wrote: only accepted tokens' were published.
    follow = [p + done[str(i)].outputs[0].token_ids for i, p in enumerate(prompts[:8])]
    again = run_engine(engine, follow, params[:8])
    for i, prompt in enumerate(follow):
        assert again[str(i)].outputs[0].token_ids == reference_greedy(prompt, params[i].max_tokens, VOCAB, markov=True)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]
    assert stats["kv_blocks_in_use"] == 0


def test_stops_and_max_tokens_mid_proposal_match_decoding_without_speculation() -> None:
    tok = CharTokenizer()
    rng = random.Random(5)
    prompts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(2, 12))) for _ in range(12)]

    def llm(spec: dict | None) -> LLM:
        model = FakeModel(tok.vocab_size, eos_token_ids=[0], tokenizer=tok, markov=True)
        return LLM(model, num_kv_blocks=64, block_size=4, speculative_config=spec)

    free = llm(None).generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    params = []
    for i, out in enumerate(free):  # stops that land inside the outputs: strings, ids, and max_tokens
        ids, text = out.outputs[0].token_ids, out.outputs[0].text
        if i % 3 == 0 and len(text) > 6:
            params.append(SamplingParams(max_tokens=24, temperature=0.0, stop=[text[4:6]]))
        elif i % 3 == 1 and len(ids) > 5:
            params.append(SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[ids[5]], min_tokens=2))
        else:
            params.append(SamplingParams(max_tokens=1 + i, temperature=0.0))
    plain = llm(None).generate(prompts, params)
    spec_llm = llm(NGRAM)
    spec = spec_llm.generate(prompts, params)
    for a, b in zip(plain, spec):
        x, y = a.outputs[0], b.outputs[0]
        assert (y.token_ids, y.text, y.finish_reason, y.stop_reason) == (
            x.token_ids,
            x.text,
            x.finish_reason,
            x.stop_reason,
        )
    assert {o.outputs[0].finish_reason for o in plain} >= {"stop", "length"}
    assert spec_llm.stats()["spec_accepted_tokens"] > 0


def test_mixed_batch_with_sampled_penalised_and_logprob_requests() -> None:
    """Requests that cannot speculate (penalties, logprobs, logit_bias) share steps with verified ones and keep
    their tokens; sampled requests with a seed run too."""
    rng = random.Random(7)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(2, 20))] for _ in range(12)]
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.0, presence_penalty=0.5),
        dict(temperature=0.0, logprobs=2),
        dict(temperature=0.0, logit_bias={5: 100.0}),
    ]
    params = [SamplingParams(max_tokens=12, ignore_eos=True, **kinds[i % 4]) for i in range(len(prompts))]
    plain = LLM(FakeModel(VOCAB, markov=True), num_kv_blocks=64, block_size=4).generate(prompts, params)
    llm = LLM(FakeModel(VOCAB, markov=True), num_kv_blocks=64, block_size=4, speculative_config=NGRAM)
    spec = llm.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].logprobs == a.outputs[0].logprobs
    assert all(o.outputs[0].token_ids == [5] * 12 for o in spec[3::4])  # the bias holds under speculation
    assert llm.stats()["spec_accepted_tokens"] > 0
    # Seeded sampled requests verified in the same steps as greedy ones: repeatable, and greedy unchanged.
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    both = [seeded] * 3 + [params[0], params[3]]
    outs = [llm.generate(prompts[:3] + [prompts[0], prompts[3]], both) for _ in range(2)]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs[0])
    assert [o.outputs[0].token_ids for o in outs[0][3:]] == [
        plain[0].outputs[0].token_ids,
        plain[3].outputs[0].token_ids,
    ]


def test_stats_and_metrics() -> None:
    llm = LLM(FakeModel(VOCAB, markov=True), num_kv_blocks=64, block_size=4, speculative_config=NGRAM)
    llm.generate([[5, 6, 7, 5, 6, 7]], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    stats = llm.stats()
    drafts, proposed, accepted = stats["spec_num_drafts"], stats["spec_draft_tokens"], stats["spec_accepted_tokens"]
    assert 0 < accepted <= proposed <= 3 * drafts
    assert stats["spec_acceptance_rate"] == accepted / proposed
    assert stats["spec_mean_accepted_length"] == 1 + accepted / drafts
    # Fewer steps than tokens: that is the point.
    assert stats["num_steps"] < 30
    text = ServerMetrics().render(stats)
    assert f"kiln_spec_decode_num_draft_tokens_total {proposed}" in text
    assert f"kiln_spec_decode_num_accepted_tokens_total {accepted}" in text
    assert "kiln_spec_decode_acceptance_rate" in text and "kiln_spec_decode_mean_accepted_length" in text


def test_hopeless_proposals_back_off() -> None:
    """A sequence whose proposals are all rejected stops proposing for longer and longer."""
    model = FakeModel(VOCAB)  # context-hash logits: its outputs do not repeat their context
    llm = LLM(model, num_kv_blocks=64, block_size=4, speculative_config={**NGRAM, "num_speculative_tokens": 4})
    prompt = list(range(16)) * 4
    out = llm.generate([prompt], SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == reference_greedy(prompt, 120, VOCAB)
    stats = llm.stats()
    assert stats["spec_num_drafts"] < 20  # without back-off every one of the 119 decodes would propose


def test_ngram_lookup() -> None:
    import numpy as np

    tokens = np.array([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3])
    assert ngram_lookup(tokens, 1, 3, 2) == [5, 6]  # the latest earlier match of [1, 2, 3]
    assert ngram_lookup(tokens, 1, 3, 6) == [4, 9, 1, 2, 3, 5]  # the latest match with 6 followers
    assert ngram_lookup(np.array([7, 8, 9]), 1, 3, 2) == []
    assert ngram_lookup(np.array([7, 7]), 1, 3, 3) == [7]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("ngram", "speculative_config must be a dict"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens is required"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "min"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "does not take"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model is required"),
    ],
)
def test_bad_config_names_the_field(config: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(config)
    with pytest.raises(ValueError, match=message):
        LLMEngine(FakeModel(VOCAB), num_kv_blocks=8, speculative_config=config)

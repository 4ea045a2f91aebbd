"""Incremental text, stop strings cut exactly (stop string excluded), and streamed text never retracted."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_fakes import CharTokenizer, FakeModel

from kiln.runtime.engine import LLMEngine
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

TOK = CharTokenizer()
PROMPT = "the end is near"


def make_llm() -> LLM:
    return LLM(FakeModel(TOK.vocab_size, tokenizer=TOK), num_kv_blocks=64, block_size=4)


LLM_ = make_llm()
FREE = LLM_.generate(PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0].outputs[0]


def test_free_run_text_is_the_decoded_tokens() -> None:
    assert FREE.text == TOK.decode(FREE.token_ids)
    assert len(FREE.text) > 20


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 50), length=st.integers(1, 6))
def test_stop_string_cuts_text_before_its_first_occurrence(start: int, length: int) -> None:
    stop = FREE.text[start : start + length]
    if not stop:
        return
    out = LLM_.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=[stop, "not-in-text"])
    )[0].outputs[0]
    cut = FREE.text.find(stop)
    assert out.text == FREE.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert FREE.token_ids[: len(out.token_ids)] == out.token_ids
    # Generation ended on the token that completed the stop string, not later.
    assert len(TOK.decode(out.token_ids)) >= cut + len(stop) > len(TOK.decode(out.token_ids[:-1]))


def test_earliest_of_several_stop_strings_wins() -> None:
    a, b = FREE.text[10:13], FREE.text[4:6]
    out = LLM_.generate(PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=[a, b]))[0].outputs[
        0
    ]
    first = min(FREE.text.find(a), FREE.text.find(b))
    assert out.text == FREE.text[:first]


def test_streamed_text_only_grows() -> None:
    stop = FREE.text[30:34]
    engine = LLMEngine(FakeModel(TOK.vocab_size, tokenizer=TOK), num_kv_blocks=64, block_size=4)
    engine.add_request("s", PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=stop))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    final = texts[-1]
    assert final == FREE.text[: FREE.text.find(stop)]
    assert all(final.startswith(t) for t in texts), "streamed text was later retracted"
    assert all(stop not in t for t in texts)


def test_stop_strings_wait_for_min_tokens() -> None:
    min_tokens = 10
    checked_from = len(TOK.decode(FREE.token_ids[: min_tokens - 1]))  # text before the first checked token
    stop = next(c for c in FREE.text[:checked_from] if c in FREE.text[checked_from:])  # occurs early and late
    out = LLM_.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, stop=stop, min_tokens=min_tokens)
    )[0].outputs[0]
    assert len(out.token_ids) >= min_tokens and out.finish_reason == "stop"
    assert out.text == FREE.text[: FREE.text.find(stop, checked_from)]


def test_special_tokens_skipped_or_kept() -> None:
    bos = 1  # CharTokenizer's <s>; the fake model never favours it, so force it through the prompt tokens
    engine = LLMEngine(FakeModel(TOK.vocab_size, tokenizer=TOK), num_kv_blocks=64, block_size=4)
    for skip in (True, False):
        seq = engine.make_request(f"r{skip}", [bos, 5], SamplingParams(skip_special_tokens=skip)).seqs[0]
        for token in (bos, 5, bos):
            seq.token_ids.append(token)
            engine.detokenizer.update(seq, can_stop=True)
        assert seq.text == TOK.decode([bos, 5, bos], skip_special_tokens=skip)

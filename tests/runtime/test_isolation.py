"""One request's failure is its own: the others in its batch keep the tokens they would have had alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
from runtime_fakes import CharTokenizer, FakeModel, reference_greedy

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.llm import LLM
from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test with async scheduling off and on

VOCAB = 64
PROMPTS = [[3, 1, 4], [1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _alone() -> list[list[int]]:
    return [reference_greedy(p, GREEDY.max_tokens, VOCAB) for p in PROMPTS]


def _generate(llm: LLM, odd: SamplingParams) -> tuple[list, object]:
    outs = llm.generate(PROMPTS + [[7, 7, 7]], [GREEDY] * len(PROMPTS) + [odd], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs[:-1]], outs[-1]


@pytest.mark.parametrize(
    "odd",
    [
        SamplingParams(temperature=1e-39, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1e-40, max_tokens=12, ignore_eos=True),
        SamplingParams(
            temperature=1e-5,
            top_k=3,
            min_p=0.5,
            repetition_penalty=1e9,
            presence_penalty=2.0,
            frequency_penalty=-2.0,
            max_tokens=12,
            ignore_eos=True,
            logprobs=5,
        ),
        SamplingParams(temperature=100.0, top_p=1e-9, max_tokens=12, ignore_eos=True, seed=3),
    ],
)
def test_extreme_but_valid_values_sample_sanely(odd: SamplingParams) -> None:
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=64, block_size=4)
    others, out = _generate(llm, odd)
    assert others == _alone()
    tokens = out.outputs[0].token_ids
    assert out.error is None and len(tokens) == 12 and all(0 <= t < VOCAB for t in tokens)
    if odd.temperature < 1e-5:
        assert tokens == reference_greedy([7, 7, 7], 12, VOCAB), "temperatures below 1e-5 are greedy"
    assert llm.stats()["kv_blocks_in_use"] == 0


@pytest.fixture
def seed_666_breaks_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling raises for any batch holding a request with seed 666 (a stand-in for a math error)."""
    draw = Sampler._draw

    def fragile(x: torch.Tensor, seqs: list) -> torch.Tensor:
        if any(s.params.seed == 666 for s in seqs):
            raise FloatingPointError("this row's parameters break the math")
        return draw(x, seqs)

    monkeypatch.setattr(Sampler, "_draw", staticmethod(fragile))


@pytest.mark.usefixtures("seed_666_breaks_sampling")
def test_a_row_that_cannot_be_sampled_fails_its_request_alone() -> None:
    llm = LLM(FakeModel(VOCAB), num_kv_blocks=64, block_size=4)
    others, out = _generate(llm, SamplingParams(temperature=0.7, seed=666, max_tokens=12, n=2))
    assert others == _alone()
    assert out.finished and "FloatingPointError" in out.error
    assert [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert llm.stats()["kv_blocks_in_use"] == 0


def test_text_that_cannot_be_decoded_fails_its_request_alone() -> None:
    class Fussy(CharTokenizer):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            if 2 in ids and len(ids) > 1 and ids[0] == 7:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return super().decode(ids, skip_special_tokens)

    tok = Fussy()
    engine = LLMEngine(FakeModel(tok.vocab_size, tokenizer=tok), num_kv_blocks=64, block_size=4)
    engine.add_request("bad", [7, 2, 2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.add_request("good", [8, 9], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert "UnicodeDecodeError" in done["bad"].error and done["good"].error is None
    assert done["good"].outputs[0].token_ids == reference_greedy([8, 9], 5, tok.vocab_size)
    assert engine.stats()["kv_blocks_in_use"] == 0


class FlakyModel(FakeModel):
    """Its forward raises whenever token 63 is in the batch (a stand-in for a kernel failure)."""

    def forward(self, input_ids, positions, meta, kv_caches):
        if bool((input_ids == 63).any()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().forward(input_ids, positions, meta, kv_caches)


def test_a_failed_forward_fails_its_batch_and_the_queue_goes_on() -> None:
    engine = LLMEngine(FlakyModel(VOCAB), num_kv_blocks=64, block_size=4, max_num_seqs=2)
    engine.add_request("poison", [63, 1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request("neighbour", [2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request("later", [4, 5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert "illegal memory access" in done["poison"].error and "illegal" in done["neighbour"].error
    assert done["later"].error is None
    assert done["later"].outputs[0].token_ids == reference_greedy([4, 5], 4, VOCAB)
    assert engine.stats()["kv_blocks_in_use"] == 0 and not engine.scheduler.has_unfinished()


@pytest.mark.usefixtures("seed_666_breaks_sampling")
def test_async_engine_raises_only_to_the_failed_request() -> None:
    engine = AsyncLLMEngine(LLMEngine(FakeModel(VOCAB), num_kv_blocks=64, block_size=4))

    async def consume(rid: str, prompt: list[int], params: SamplingParams) -> list[int] | str:
        last = None
        try:
            async for out in engine.generate(prompt, params, rid):
                last = out
        except RuntimeError as exc:
            return str(exc)
        return last.outputs[0].token_ids

    async def main() -> list:
        jobs = [consume(f"s{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
        jobs.append(consume("bad", [7, 7], SamplingParams(temperature=0.5, seed=666, max_tokens=12)))
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert results[:-1] == _alone()
    assert "request bad failed" in results[-1] and "FloatingPointError" in results[-1]

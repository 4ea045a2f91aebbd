"""Prompt logprobs (vLLM's `prompt_logprobs`, the basis of `echo` scoring) equal log_softmax of HF's forward on
the same tokens, whole or chunked, with prefix caching on, and beside ordinary requests in the same steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

PROMPTS = [[1, 17, 230, 45, 99, 3, 250, 7, 61, 400, 12, 5, 88], [1, 300, 2, 9]]


@pytest.fixture(scope="module")
def hf(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32).eval()


@torch.no_grad()
def _reference(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor(tokens)[None]).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_hf_log_softmax(checkpoint, hf, chunk) -> None:
    options = {"max_num_batched_tokens": chunk, "enable_chunked_prefill": True} if chunk else {}
    llm = LLM(str(checkpoint("llama")), num_kv_blocks=64, block_size=4, **options)
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=4, temperature=0.0)
    for _ in range(2):  # the second time, the prompt's blocks are in the prefix cache: still all scored
        outs = llm.generate([*PROMPTS, PROMPTS[0]], [scored, scored, plain])
        for prompt, out in zip(PROMPTS, outs):
            ref = _reference(hf, prompt)
            assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
            assert len(out.prompt_logprobs) == len(prompt)
            for p in range(1, len(prompt)):
                entry = out.prompt_logprobs[p]
                assert abs(entry[prompt[p]] - ref[p - 1, prompt[p]].item()) < 1e-4
                top = ref[p - 1].topk(3)
                for token, value in zip(top.indices.tolist(), top.values.tolist()):
                    assert abs(entry[token] - value) < 1e-4
        assert outs[2].prompt_logprobs is None
        assert outs[2].outputs[0].token_ids == llm.generate([PROMPTS[0]], plain)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def live(checkpoint):
    from test_server import LiveServer

    from kiln.runtime.async_engine import AsyncLLMEngine
    from kiln.runtime.server import build_app

    engine = AsyncLLMEngine.from_model(str(checkpoint("llama")), num_kv_blocks=64, block_size=4)
    server = LiveServer(build_app(engine, "tiny", None), engine)
    yield server
    server.stop()


def test_echo_with_logprobs_scores_the_prompt_as_hf_does(live, hf) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
    prompt = PROMPTS[0]
    ref = _reference(hf, prompt)
    choice = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, logprobs=2, echo=True, temperature=0
    ).choices[0]
    lps = choice.logprobs
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert len(lps.token_logprobs) == len(prompt) + 1  # the prompt, then the one generated token
    for p in range(1, len(prompt)):
        assert abs(lps.token_logprobs[p] - ref[p - 1, prompt[p]].item()) < 1e-4
        assert abs(max(lps.top_logprobs[p].values()) - ref[p - 1].max().item()) < 1e-4
    text = live.engine.engine.tokenizer.decode(prompt)
    assert choice.text.startswith(text) and lps.text_offset[0] == 0
    streamed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, logprobs=0, echo=True, temperature=0, stream=True
    )
    chunks = [c for c in streamed if c.choices]
    assert chunks[0].choices[0].text.startswith(text)
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    raw = live.http.post(
        "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0}
    ).json()["choices"][0]
    assert raw["prompt_logprobs"][0] is None
    assert abs(raw["prompt_logprobs"][1][str(prompt[1])]["logprob"] - ref[0, prompt[1]].item()) < 1e-4

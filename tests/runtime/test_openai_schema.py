"""The schema real clients send: every OpenAI field known, nulls as "not given", every problem named at once,
informational fields ignored, what kiln cannot do refused by name; /v1/models/{id} and /tokenizer_info."""

from __future__ import annotations

import pytest

# Skipped where the server's dependencies are absent, as test_server.py says.
openai = pytest.importorskip("openai")

from test_server import KEY, LiveServer  # noqa: E402

from kiln.runtime.async_engine import AsyncLLMEngine  # noqa: E402
from kiln.runtime.llm import LLM  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402
from kiln.runtime.server import build_app  # noqa: E402

MODEL = "tiny-llama"
CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def live(checkpoint):
    engine = AsyncLLMEngine.from_model(str(checkpoint("llama")), num_kv_blocks=256, block_size=16)
    server = LiveServer(build_app(engine, MODEL, KEY), engine)
    yield server
    server.stop()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)


def _error(live: LiveServer, path: str, body: dict) -> dict:
    res = live.http.post(path, json={"model": MODEL, **body})
    assert res.status_code == 400, res.text
    return res.json()["error"]


def test_every_unknown_field_is_named_in_one_error(live) -> None:
    error = _error(live, "/v1/completions", {"prompt": "a", "colour": 1, "flavour": 2})
    assert "colour" in error["message"] and "flavour" in error["message"] and error["param"] == "colour"


def test_several_refusals_are_named_together(live) -> None:
    error = _error(live, "/v1/completions", {"prompt": "a", "suffix": "z", "n": 2, "best_of": 1})
    assert error["message"].startswith("suffix: not supported") and "best_of: must be at least n" in error["message"]
    error = _error(live, "/v1/chat/completions", {"messages": CHAT, "audio": {"voice": "x"}, "modalities": ["audio"]})
    assert "audio: not supported" in error["message"] and "modalities: only" in error["message"]
    error = _error(live, "/v1/completions", {"prompt": "a", "best_of": 3, "stream": True})
    assert error["param"] == "best_of" and "stream" in error["message"]
    error = _error(live, "/v1/completions", {"prompt": "a", "logit_bias": {"x": 1, "5": 500}})
    assert error["param"] == "logit_bias"


def test_nulls_and_informational_fields_are_accepted(live, client) -> None:
    nulls = {"n": None, "stream": None, "logprobs": None, "stop": None, "seed": None, "temperature": 0}
    res = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 3, **nulls})
    assert res.status_code == 200 and len(res.json()["choices"]) == 1, res.text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_completion_tokens=3,
        store=False,
        metadata={"team": "kiln"},
        service_tier="auto",
        user="u-1",
        safety_identifier="s-1",
        prompt_cache_key="k",
        reasoning_effort="low",
        verbosity="low",
        modalities=["text"],
        prediction={"type": "content", "content": "Hello"},
        temperature=0,
    )
    assert chat.choices[0].finish_reason in {"length", "stop"}
    done = client.completions.create(model=MODEL, prompt="a", max_tokens=2, user="u", suffix="", temperature=0)
    assert done.choices[0].text is not None


def test_model_card_and_tokenizer_info(live, client) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    info = live.http.get("/tokenizer_info").json()
    tokenizer = live.engine.engine.tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 512
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert live.http.get("/tokenizer_info", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_logit_bias_steers_greedy_tokens_and_leaves_other_rows_alone(live, client) -> None:
    common = {"model": MODEL, "prompt": "The kiln", "max_tokens": 6, "temperature": 0}
    plain = client.completions.create(**common, logprobs=0).choices[0]
    forced = client.completions.create(**common, logit_bias={"77": 100}, logprobs=0).choices[0]
    assert forced.logprobs.tokens and set(forced.logprobs.tokens) == {live.engine.engine.tokenizer.decode([77])}
    llm = LLM(live.engine.engine.model, num_kv_blocks=64, block_size=16)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = llm.generate([[1, 40, 41]], greedy)[0].outputs[0].token_ids
    banned = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={alone[0]: -100})
    outs = llm.generate([[1, 40, 41], [1, 40, 41]], [banned, greedy])
    assert outs[0].outputs[0].token_ids[0] != alone[0] and outs[1].outputs[0].token_ids == alone
    again = client.completions.create(**common).choices[0]
    assert again.text == plain.text  # an unbiased request is untouched


def test_best_of_returns_the_n_likeliest_of_its_samples(live, client) -> None:
    prompt, common = [1, 40, 41], {"max_tokens": 5, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    llm = LLM(live.engine.engine.model, num_kv_blocks=64, block_size=16)
    samples = llm.generate([prompt], SamplingParams(n=3, logprobs=0, **common))[0].outputs
    ranked = sorted(samples, key=lambda c: c.cumulative_logprob, reverse=True)
    extra = {"seed": 7, "ignore_eos": True}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 1.0, **extra}
    best = live.http.post("/v1/completions", json={**body, "n": 1, "best_of": 3}).json()
    assert [c["text"] for c in best["choices"]] == [ranked[0].text] and best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 15  # every sample counts
    two = live.http.post("/v1/completions", json={**body, "n": 2, "best_of": 3, "logprobs": 1}).json()
    assert [c["text"] for c in two["choices"]] == [c.text for c in ranked[:2]]
    assert [c["index"] for c in two["choices"]] == [0, 1]

"""The schema real clients send: every OpenAI field known, nulls as "not given", every problem named at once,
informational fields ignored, what kiln cannot do refused by name; /v1/models/{id} and /tokenizer_info."""

from __future__ import annotations

import openai
import pytest
from test_server import KEY, LiveServer

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.server import build_app

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

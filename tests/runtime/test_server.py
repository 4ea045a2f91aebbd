"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest

# The server's own dependencies and the clients that drive it: absent on a machine with only kiln's core
# (the GPU machine), where these tests skip; `make test` installs them.
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from kiln.runtime.async_engine import AsyncLLMEngine  # noqa: E402
from kiln.runtime.llm import LLM  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402
from kiln.runtime.server import build_app  # noqa: E402
from kiln.runtime.serving import ServerLimits  # noqa: E402

MODEL = "tiny-llama"
KEY = "sk-kiln-test"
GREEDY = {"temperature": 0.0}


class LiveServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def metric(self, name: str) -> float:
        text = self.http.get("/metrics").text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, f"{name} missing from /metrics"
        return float(match.group(1))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is in flight and no KV block is held (fails after `timeout`)."""
        deadline = time.time() + timeout
        while self.metric("kiln_num_unfinished_requests") or self.metric("kiln_kv_blocks_in_use"):
            assert time.time() < deadline, "requests or KV blocks still held"
            time.sleep(0.05)

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(checkpoint):
    engine = AsyncLLMEngine.from_model(str(checkpoint("llama")), num_kv_blocks=512, block_size=16)
    server = LiveServer(build_app(engine, MODEL, KEY, ServerLimits(max_body_bytes=64 * 1024)), engine)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline(live):
    """A second engine over the same compiled model, for expected outputs."""
    return LLM(live.engine.engine.model, num_kv_blocks=128, block_size=16)


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)


def test_completion_matches_offline_generate(live, client, offline) -> None:
    prompt = "The kiln was built at the edge of the village,"
    res = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY
    )
    expected = offline.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))[0]
    assert res.choices[0].text == expected.outputs[0].text
    assert res.choices[0].finish_reason == "length"
    assert res.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert res.usage.completion_tokens == 12 and res.usage.total_tokens == res.usage.prompt_tokens + 12
    assert res.model == MODEL and res.object == "text_completion"


def test_chat_completion_uses_chat_template(live, client, offline) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a kiln?"}]
    res = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, extra_body={"ignore_eos": True}, **GREEDY
    )
    ids = live.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    tok = offline.get_tokenizer()
    assert ids == tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    expected = offline.generate(ids, SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY))[0]
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == expected.outputs[0].text
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(ids), 10)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_unstreamed(client, endpoint: str) -> None:
    args = dict(model=MODEL, max_tokens=16, n=2, extra_body={"ignore_eos": True, "stop": ["e"]}, **GREEDY)
    if endpoint == "chat":
        create = client.chat.completions.create
        args["messages"] = [{"role": "user", "content": "Tell me about clay."}]
    else:
        create = client.completions.create
        args["prompt"] = "Once upon a time there was a small robot who"
    whole = create(**args)
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in create(**args, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content or "") if endpoint == "chat" else choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    for choice in whole.choices:
        text = choice.message.content if endpoint == "chat" else choice.text
        assert (texts[choice.index], reasons[choice.index]) == (text, choice.finish_reason)
    assert usage == whole.usage


def test_sse_wire_format_ends_with_usage_then_done(live) -> None:
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        **GREEDY,
    }
    with live.http.stream("POST", "/v1/completions", json=body) as res:
        raw = res.read().decode()
    assert res.headers["content-type"].startswith("text/event-stream")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    last = json.loads(events[-3][len("data: ") :])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] <= 4


def test_logprobs_seed_and_stop(client) -> None:
    res = client.completions.create(model=MODEL, prompt="Numbers like", max_tokens=6, logprobs=3, **GREEDY)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(1 <= len(top) <= 4 and max(top.values()) >= v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY
    )
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [2] * 4
    sampled = [
        client.completions.create(
            model=MODEL,
            prompt="The weather",
            max_tokens=8,
            temperature=1.0,
            seed=7,
            top_p=0.9,
            extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1},
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    full = (
        client.completions.create(
            model=MODEL, prompt="The weather", max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = client.completions.create(
        model=MODEL, prompt="The weather", max_tokens=12, stop=[stop], extra_body={"ignore_eos": True}, **GREEDY
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


BAD_REQUESTS = {
    "invalid JSON": (b'{"model": "tiny-llama", "prompt": ', None),
    "unknown field": ({"prompt": "hi", "best_of_all": 3}, "best_of_all"),
    "temperature out of range": ({"prompt": "hi", "temperature": 1e6}, "temperature"),
    "top_p negative": ({"prompt": "hi", "top_p": -1}, "top_p"),
    "max_tokens zero": ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "wrong type": ({"prompt": "hi", "n": "2"}, "n"),
    "n over the limit": ({"prompt": "hi", "n": 1000}, "n"),
    "too many stop strings": ({"prompt": "hi", "stop": [f"s{i}" for i in range(100)]}, "stop"),
    "token id out of vocabulary": ({"prompt": [1, 2, 10**6]}, "prompt"),
    "prompt too long": ({"prompt": "clay " * 600, "max_tokens": 10}, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_400_in_openai_shape(live, case: str) -> None:
    body, param = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps({"model": MODEL, **body}).encode()
    res = live.http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if case == "prompt too long":
        assert re.match(
            r"This model's maximum context length is 512 tokens\. However, you requested (\d+) "
            r"tokens \((\d+) in the messages, 10 in the completion\)\.",
            error["message"],
        )


def test_chat_errors_through_the_client(client) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x " * 300}], max_completion_tokens=400
        )
    assert "maximum context length is 512 tokens" in exc.value.message
    assert exc.value.body["param"] == "messages" and exc.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])


def test_auth_model_and_size_errors(live, client) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert exc.value.body["code"] == "invalid_api_key"
    missing = httpx.get(f"{live.url}/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-5", prompt="hi")
    assert exc.value.body["param"] == "model"
    res = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 100_000})
    assert res.status_code == 413 and res.json()["error"]["code"] == "request_too_large"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_operational_endpoints(live) -> None:
    assert live.http.get("/health").status_code == 200
    assert live.http.get("/version").json()["version"]
    ids = live.http.post("/tokenize", json={"prompt": "The kiln"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
    assert live.http.post("/detokenize", json={"tokens": ids["tokens"][1:]}).json()["prompt"] == "The kiln"
    text = live.http.get("/metrics").text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("kiln_") for n in names)
    for name in (
        "kiln_time_to_first_token_seconds",
        "kiln_time_per_output_token_seconds",
        "kiln_kv_cache_usage_perc",
        "kiln_num_preemptions_total",
        "kiln_http_requests_total",
    ):
        assert name in names


def test_dropped_stream_is_aborted_and_frees_its_blocks(live, client, monkeypatch) -> None:
    # Each step takes 5 ms at least, so the 480-token requests below are still running when their clients give
    # up, however fast the model is.
    step = live.engine.engine.step
    monkeypatch.setattr(live.engine.engine, "step", lambda: time.sleep(0.005) or step())
    aborted = 'kiln_request_finished_total{finished_reason="abort"}'
    before = live.metric(aborted) if aborted in live.http.get("/metrics").text else 0.0
    stream = client.completions.create(
        model=MODEL, prompt="The kiln", max_tokens=480, stream=True, extra_body={"ignore_eos": True}, **GREEDY
    )
    chunks = iter(stream)
    assert all(next(chunks).choices for _ in range(3))
    assert live.metric("kiln_kv_blocks_in_use") > 0
    stream.close()
    live.wait_idle()
    assert live.metric(aborted) == before + 1
    body = {"model": MODEL, "prompt": "The kiln", "max_tokens": 480, "ignore_eos": True, **GREEDY}
    with pytest.raises(httpx.ReadTimeout):  # an unstreamed request whose client gives up
        live.http.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    live.wait_idle()
    assert live.metric(aborted) == before + 2
    monkeypatch.undo()
    res = client.completions.create(model=MODEL, prompt="Still there?", max_tokens=3, **GREEDY)
    assert res.usage.completion_tokens >= 1


def test_200_concurrent_streams(live) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, finish, tokens = None, None, 0
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Request {i}: the potter",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        async for chunk in stream:
            first = first or time.perf_counter()
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            else:
                tokens = chunk.usage.completion_tokens
        assert finish == "length"
        return first - start, time.perf_counter() - start, tokens

    async def run() -> list[tuple[float, float, int]]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with openai.AsyncOpenAI(
            base_url=f"{live.url}/v1",
            api_key=KEY,
            max_retries=0,
            timeout=120,
            http_client=httpx.AsyncClient(limits=limits, timeout=120),
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    assert [tokens for _, _, tokens in results] == [8] * 200
    live.wait_idle()
    ttft, e2e = sorted(r[0] for r in results), sorted(r[1] for r in results)
    print(
        f"\n200 streams x 8 tokens in {wall:.2f} s; TTFT p50/p90/p99 {_percentiles(ttft)} s; "
        f"latency p50/p90/p99 {_percentiles(e2e)} s"
    )


def _percentiles(values: list[float]) -> str:
    return "/".join(f"{values[min(len(values) - 1, int(p * len(values)))]:.3f}" for p in (0.5, 0.9, 0.99))

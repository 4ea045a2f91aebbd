"""Structured output and tool calling through `kiln serve`'s routes, driven by the real openai SDK on loopback
(and raw HTTP for the error shapes). The tiny model emits nonsense unless constrained."""

from __future__ import annotations

import json
from typing import Literal

import pytest

# Skipped where the server's dependencies are absent, as test_server.py says.
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from pydantic import BaseModel, Field  # noqa: E402
from test_server import LiveServer  # noqa: E402

from kiln.runtime.async_engine import AsyncLLMEngine  # noqa: E402
from kiln.runtime.server import build_app  # noqa: E402

MODEL = "tiny-llama"
KEY = "sk-kiln-test"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "days"],
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Pet(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog"]


@pytest.fixture(scope="module")
def live(checkpoint):
    engine = AsyncLLMEngine.from_model(str(checkpoint("llama")), num_kv_blocks=256, block_size=16)
    server = LiveServer(build_app(engine, MODEL, KEY), engine)
    yield server
    server.stop()


@pytest.fixture()
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)


def test_parse_with_a_pydantic_model(client) -> None:
    done = client.chat.completions.parse(
        model=MODEL, messages=USER, response_format=Pet, max_completion_tokens=64, temperature=0.0
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)


def test_json_schema_regex_and_choice_on_both_endpoints(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    chat = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=64, seed=1)
    jsonschema.validate(json.loads(chat.choices[0].message.content), WEATHER)
    done = client.completions.create(
        model=MODEL, prompt="Code:", max_tokens=20, temperature=0.9, n=2, extra_body={"guided_regex": r"[A-Z]{3}-\d{2}"}
    )
    assert all(c.text[:3].isupper() and c.text[3] == "-" and len(c.text) == 6 for c in done.choices)
    picked = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=8, extra_body={"guided_choice": ["sunny", "rainy day"]}
    )
    assert picked.choices[0].message.content in ("sunny", "rainy day")
    plain = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, response_format={"type": "text"})
    assert plain.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, None),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ],
)
def test_invalid_constraints_are_400s_naming_the_field(live, extra: dict, param: str | None) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, **extra}
    r = live.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == (param or "response_format"), error
    assert (param or "response_format") in error["message"]


def test_named_and_required_tool_calls_follow_their_schemas(client) -> None:
    named = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0.8,
        seed=5,
    )
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    required = client.chat.completions.create(  # one call: a random model could list calls forever
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=128,
        temperature=0.0,
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_auto_tool_calls_whole_and_streamed(client) -> None:
    """The tiny model cannot choose to call a tool, so a regex makes it write a Hermes call; auto reads it."""
    forced = {"guided_regex": r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}</tool_call>'}
    kwargs = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=64, temperature=0.0, extra_body=forced)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += (d.function and d.function.name) or ""
                entry["arguments"] += (d.function and d.function.arguments) or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"name": "get_time", "arguments": call.function.arguments}}
    plain = client.chat.completions.create(**{**kwargs, "extra_body": {"guided_choice": ["no tools"]}})
    assert plain.choices[0].message.content == "no tools" and not plain.choices[0].message.tool_calls


def test_named_tool_call_streams_its_arguments(client) -> None:
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=32,
        temperature=0.0,
        stream=True,
    )
    name, arguments = "", ""
    for chunk in chunks:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                name += (d.function and d.function.name) or ""
                arguments += (d.function and d.function.arguments) or ""
    assert name == "get_time"
    jsonschema.validate(json.loads(arguments), TIME)


def test_tool_history_nulls_and_tools_in_the_template(live, client, monkeypatch) -> None:
    history = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    body = {"model": MODEL, "messages": history, "max_tokens": 2, "n": None, "stream": None, "tool_choice": None}
    r = live.http.post("/v1/chat/completions", json={**body, "parallel_tool_calls": None, "response_format": None})
    assert r.status_code == 200, r.text
    tokenizer = live.engine.engine.tokenizer
    template = "{% for t in tools or [] %}{{ t.function.name }} {% endfor %}" + tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template)
    sizes = [
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, **extra).usage.prompt_tokens
        for extra in ({}, {"tools": TOOLS, "parallel_tool_calls": False})
    ]
    assert sizes[1] > sizes[0]  # the template saw the tools

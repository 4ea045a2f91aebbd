"""Tool-call parsing and streaming deltas, without a model: the Hermes parser, and the stream of a choice fed
its text piece by piece gives the same content and calls as the whole text."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from kiln.runtime.tool_calls import HermesParser, ToolCalling, parser_for, register_parser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def test_hermes_parses_calls_and_the_content_before_them() -> None:
    parser = HermesParser()
    assert parser.parse("just text") == ("just text", [])
    content, calls = parser.parse("Let me look. " + CALL + CALL.replace("Paris", "Oslo"))
    assert content == "Let me look. "
    assert [n for n, _ in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[1][1]) == {"city": "Oslo", "days": 2}
    assert parser.parse(CALL[: -len("</tool_call>")])[1]  # a last block cut off by EOS still counts
    assert parser.parse("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert parser_for("qwen2").__class__ is HermesParser


def test_a_family_can_register_its_own_parser() -> None:
    class Custom(HermesParser):
        start, end = "[CALL]", "[/CALL]"

    register_parser("custom-test", Custom, ("custom_family",))
    assert isinstance(parser_for("custom_family"), Custom)


def _request(choice, tools=("get_weather",), parallel=None):
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    made = [SimpleNamespace(function=SimpleNamespace(name=n, parameters=params)) for n in tools]
    return SimpleNamespace(tools=made, tool_choice=choice, parallel_tool_calls=parallel)


def _stream(tools: ToolCalling, text: str, step: int = 3) -> tuple[str, list[dict], str | None]:
    """Feed `text` in pieces of `step` characters, the last with finish_reason "stop"; merge the deltas."""
    content, calls, finish = "", [], None
    for end in range(step, len(text) + step, step):
        last = end >= len(text)
        delta, finish = tools.delta(0, text[:end], "stop" if last else None)
        for call in (delta or {}).get("tool_calls", []):
            if call["index"] == len(calls):
                calls.append({"name": call["function"].get("name"), "arguments": ""})
            calls[call["index"]]["arguments"] += call["function"]["arguments"]
        content += (delta or {}).get("content") or ""
        if last:
            break
    return content, calls, finish


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_auto_streaming_matches_the_whole_message(step: int) -> None:
    text = "Sure. " + CALL
    tools, structure = ToolCalling.build(_request("auto"), "llama")
    assert structure is None
    message, finish = tools.message(text, "stop")
    content, calls, stream_finish = _stream(ToolCalling.build(_request("auto"), "llama")[0], text, step)
    assert finish == stream_finish == "tool_calls"
    assert content == message["content"] == "Sure. "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]
    ]
    plain, no_calls, plain_finish = _stream(ToolCalling.build(_request("auto"), "llama")[0], "a <tool plain", step)
    assert (plain, no_calls, plain_finish) == ("a <tool plain", [], "stop")


def test_required_and_named_choices_constrain_and_read_the_output() -> None:
    tools, structure = ToolCalling.build(_request("required", ("a", "b"), parallel=False), None)
    assert structure is not None and structure.json["maxItems"] == 1
    assert [x["properties"]["name"]["enum"] for x in structure.json["items"]["anyOf"]] == [["a"], ["b"]]
    message, finish = tools.message('[{"name": "b", "parameters": {"city": "Rome"}}]', "stop")
    assert finish == "tool_calls" and message["tool_calls"][0]["function"]["name"] == "b"
    named = SimpleNamespace(type="function", function=SimpleNamespace(name="b"))
    tools, structure = ToolCalling.build(_request(named, ("a", "b")), None)
    assert structure is not None and structure.json["required"] == ["city"]
    message, finish = tools.message('{"city": "Rome"}', "stop")
    assert finish == "stop" and message["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'
    content, calls, _ = _stream(tools, '{"city": "Rome"}', 2)
    assert content == "" and calls == [{"name": "b", "arguments": '{"city": "Rome"}'}]


def test_bad_tool_choices_are_value_errors_naming_the_field() -> None:
    missing = SimpleNamespace(type="function", function=SimpleNamespace(name="nope"))
    with pytest.raises(ValueError, match="^tool_choice names function 'nope'"):
        ToolCalling.build(_request(missing), None)
    with pytest.raises(ValueError, match="^tool_choice needs tools"):
        ToolCalling.build(_request("required", ()), None)
    with pytest.raises(ValueError, match="^tools must have distinct"):
        ToolCalling.build(_request("auto", ("a", "a")), None)
    assert ToolCalling.build(_request("none"), None) == (None, None)

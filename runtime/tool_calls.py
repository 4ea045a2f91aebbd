"""Tool calling in vLLM's shape: the constraint a `tool_choice` puts on the output, and the tool calls read
back from the text, whole or streamed.

- `"none"` (the default without tools): plain text.
- `"auto"` (the default with tools): the model decides; calls are parsed from its text by the model family's
  parser (`PARSERS`, Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` by default) and
  returned as `message.tool_calls` with `finish_reason: "tool_calls"`.
- `"required"`: the output is constrained to a JSON array of `{"name", "parameters"}` objects over the tools
  (at most one when `parallel_tool_calls` is false), as vLLM does; `finish_reason: "tool_calls"`.
- a named function: the output is that function's arguments, constrained to its parameter schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .structured_output import StructuredOutput

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    """One OpenAI tool call (with its `index` when it is a stream delta)."""
    call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


class HermesParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen 2.5/3 and others); the
    text before the first block is the message's content."""

    start, end = "<tool_call>", "</tool_call>"
    _block = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)

    @staticmethod
    def _call(body: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)

    def closed_calls(self, text: str) -> list[tuple[str, str]] | None:
        """The calls of the complete blocks in `text`; None when one of them is not a valid call."""
        calls = []
        for body in self._block.findall(text):
            call = self._call(body.strip())
            if call is None:
                return None
            calls.append(call)
        return calls

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """(content, [(name, arguments JSON)]) of a finished output; all content when no valid call is found."""
        cut = text.find(self.start)
        if cut < 0:
            return text, []
        rest = text[cut:]
        if rest.find(self.end, rest.rfind(self.start)) < 0:
            rest += self.end  # a last block cut off by EOS is still read
        calls = self.closed_calls(rest)
        if not calls:
            return text, []
        return text[:cut] or None, calls


PARSERS: dict[str, type[HermesParser]] = {"hermes": HermesParser}
FAMILY_PARSERS: dict[str, str] = {}  # model_type -> parser name, for families whose format is not Hermes'


def register_parser(name: str, parser: type[HermesParser], families: tuple[str, ...] = ()) -> None:
    """Add a tool-call parser (any class with HermesParser's methods) and the model families that use it."""
    PARSERS[name] = parser
    FAMILY_PARSERS.update(dict.fromkeys(families, name))


def parser_for(model_type: str | None) -> HermesParser:
    return PARSERS[FAMILY_PARSERS.get(model_type or "", "hermes")]()


def _required_schema(tools: list[Any], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for tool_choice="required": a non-empty array of calls, each naming one of the tools."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or EMPTY_PARAMETERS,
            },
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclass
class _StreamState:
    content_sent: int = 0  # characters of content already streamed
    calls_sent: int = 0
    opened: bool = False  # named choice: the call's header went out


@dataclass
class ToolCalling:
    """How one chat request's outputs become messages: mode is "auto", "required" or the named function."""

    mode: str
    parser: HermesParser
    named: str | None = None
    streams: dict[int, _StreamState] = field(default_factory=dict)

    @classmethod
    def build(cls, req: Any, model_type: str | None) -> tuple[ToolCalling | None, StructuredOutput | None]:
        """The request's tool handling and the constraint it puts on the output (ValueError naming the field)."""
        tools, choice = req.tools or [], req.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        if choice != "none" and not tools:
            raise ValueError("tool_choice needs tools")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        if choice == "none":
            return None, None
        parser = parser_for(model_type)
        if choice == "auto":
            return cls("auto", parser), None
        if choice == "required":
            schema = _required_schema(tools, req.parallel_tool_calls is not False)
            return cls("required", parser), StructuredOutput(json=schema)
        if choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools")
        tool = tools[names.index(choice.function.name)]
        return cls("named", parser, tool.function.name), StructuredOutput(
            json=tool.function.parameters or EMPTY_PARAMETERS
        )

    def _calls(self, text: str) -> list[tuple[str, str]]:
        """The calls of a finished output (empty when the text holds none)."""
        if self.mode == "named":
            assert self.named is not None
            return [(self.named, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
                return [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in items]
            except (ValueError, TypeError, KeyError):
                return []
        return self.parser.parse(text)[1]

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """(the chat message, the finish_reason to report) for a finished choice."""
        calls = self._calls(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        content = self.parser.parse(text)[0] if self.mode == "auto" else None
        message = {"role": "assistant", "content": content, "tool_calls": [tool_call(n, a) for n, a in calls]}
        return message, self._finish(finish_reason)

    def _finish(self, finish_reason: str | None) -> str | None:
        """vLLM's: "tool_calls" for auto and required choices that called; a named call keeps its reason."""
        return "tool_calls" if self.mode != "named" and finish_reason in ("stop", "tool_calls") else finish_reason

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """(the next stream delta of choice `index`, whose whole text so far is `text`, or None; its finish)."""
        state = self.streams.setdefault(index, _StreamState())
        if self.mode == "named":
            fragment = text[state.content_sent :]
            state.content_sent = len(text)
            opening = not state.opened
            state.opened = True
            if not fragment and not opening:
                return None, finish_reason
            call = (
                tool_call(self.named or "", fragment, 0)
                if opening
                else {"index": 0, "function": {"arguments": fragment}}
            )
            return {"tool_calls": [call]}, finish_reason
        if finish_reason is not None:
            return self._final_delta(state, text, finish_reason)
        if self.mode == "required":
            return None, None  # the array is read whole when it ends
        cut = text.find(self.parser.start)
        if cut < 0:  # hold back a tail that may be the start of a tag
            cut = len(text)
            for k in range(min(len(self.parser.start) - 1, len(text)), 0, -1):
                if self.parser.start.startswith(text[-k:]):
                    cut -= k
                    break
        delta: dict[str, Any] = {}
        if cut > state.content_sent:
            delta["content"] = text[state.content_sent : cut]
            state.content_sent = cut
        calls = self.parser.closed_calls(text[cut:]) or []
        if len(calls) > state.calls_sent:
            delta["tool_calls"] = [tool_call(n, a, i) for i, (n, a) in enumerate(calls) if i >= state.calls_sent]
            state.calls_sent = len(calls)
        return delta or None, None

    def _final_delta(self, state: _StreamState, text: str, finish: str) -> tuple[dict[str, Any] | None, str | None]:
        calls = self._calls(text)
        delta: dict[str, Any] = {}
        if not calls:  # no call after all: the held-back text is content
            if len(text) > state.content_sent:
                delta["content"] = text[state.content_sent :]
            return delta or None, finish
        content = self.parser.parse(text)[0] if self.mode == "auto" else None
        if content and len(content) > state.content_sent:
            delta["content"] = content[state.content_sent :]
        if len(calls) > state.calls_sent:
            delta["tool_calls"] = [tool_call(n, a, i) for i, (n, a) in enumerate(calls) if i >= state.calls_sent]
        return delta or None, self._finish(finish)

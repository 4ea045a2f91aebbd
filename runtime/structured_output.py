"""What a request's output must look like: a JSON schema, any JSON object, a regex, one of fixed strings, or a
Lark grammar (vLLM's `guided_decoding` kinds). Only the shape is checked here; `runtime/grammar.py` compiles it
(and refuses a schema or regex the grammar engine rejects) when the engine takes the request.

Objects of a schema that list `properties` and say nothing of `additionalProperties` get no other keys, as
xgrammar's strict mode (vLLM's default) does: a model may otherwise keep inventing keys, and a strict OpenAI
schema sets `additionalProperties: false` on every object anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_CHOICES = 1024
MAX_SPEC_CHARS = 1 << 20


def _close_objects(node: Any) -> Any:
    """A copy of a JSON schema whose objects with `properties` and no `additionalProperties` allow no others."""
    if isinstance(node, list):
        return [_close_objects(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _close_objects(v) for k, v in node.items()}
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@dataclass
class StructuredOutput:
    """Exactly one of: `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object), `regex`,
    `choice` (the output is one of these strings) or `grammar` (Lark, llguidance's dialect, or GBNF)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_output needs exactly one of {', '.join(KINDS)}; got {given or 'none'}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_output.json_object must be a bool, got {self.json_object!r}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as err:
                raise ValueError(f"structured_output.json is not valid JSON: {err}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_output.json must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_SPEC_CHARS):
                raise ValueError(f"structured_output.{name} must be a non-empty string of at most {MAX_SPEC_CHARS}")
        if self.choice is not None:
            ok = isinstance(self.choice, (list, tuple)) and 0 < len(self.choice) <= MAX_CHOICES
            if not ok or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(
                    f"structured_output.choice must be a list of 1 to {MAX_CHOICES} non-empty strings, "
                    f"got {self.choice!r:.80}"
                )
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """A canonical (kind, text) naming the grammar: equal keys compile to the same grammar."""
        kind = self.kind
        if kind == "json":
            return kind, json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if kind == "choice":
            return kind, json.dumps(self.choice)
        if kind == "json_object":
            return kind, ""
        return kind, getattr(self, kind)

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output follows (closed objects, see the module doc); None for regex/choice/grammar."""
        if self.json_object:
            return {"type": "object"}
        return _close_objects(self.json) if self.json is not None else None

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutput | None:
        """From SamplingParams' `structured_output`: None, a StructuredOutput, or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(str(k) for k in value if k not in KINDS)
            if unknown:
                raise ValueError(f"structured_output: unknown key(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
            return cls(**value)
        raise ValueError(f"structured_output must be a StructuredOutput or a dict, got {type(value).__name__}")

"""Structured output offline: random-weight models (which emit nonsense unconstrained) produce outputs that
follow the schema, regex or choice asked for, and constrained rows leave the other rows of a batch alone."""

from __future__ import annotations

import json
import re

import pytest
import torch

# jsonschema (a test extra) checks the outputs: absent on a machine with only kiln's core (the GPU machine), where
# these tests skip; `make test` installs it.
jsonschema = pytest.importorskip("jsonschema")

from kiln.runtime.grammar import allowed_tokens  # noqa: E402
from kiln.runtime.llm import LLM  # noqa: E402
from kiln.runtime.sampling_params import SamplingParams  # noqa: E402
from kiln.runtime.structured_output import StructuredOutput  # noqa: E402

NAME = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": -5, "maximum": 40}

# 22 schemas: nested objects, arrays, enums, bounded numbers, required and optional keys, refs, unions.
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"a": SMALL}, "required": ["a"]},
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"}}, "required": ["ok", "n"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25}}},
    {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b", 3]}, "maxItems": 3},
    {
        "type": "object",
        "properties": {"p": {"type": "object", "properties": {"q": SMALL, "r": NAME}, "required": ["q", "r"]}},
        "required": ["p"],
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 3}, "id": SMALL},
        "required": ["tags", "id"],
    },
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"enum": ["yes", "no", 1, None]},
    {"type": "object", "properties": {"v": {"anyOf": [SMALL, {"type": "null"}, {"enum": ["z"]}]}}, "required": ["v"]},
    {
        "$defs": {"pt": {"type": "object", "properties": {"x": SMALL, "y": SMALL}, "required": ["x", "y"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a"],
    },
    {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "items": {"type": "object", "properties": {"k": NAME, "v": SMALL}, "required": ["k"]},
                "maxItems": 2,
            }
        },
        "required": ["rows"],
    },
    {"type": "object", "properties": {"m": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.1}}},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["s"]},
    {"type": "object", "properties": {"e": {"const": "fixed"}, "f": {"type": "boolean"}}, "required": ["e"]},
    {"type": "array", "prefixItems": [{"type": "boolean"}, SMALL], "items": False, "minItems": 2},
    {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
    {
        "type": "object",
        "properties": {"o": {"type": "object", "properties": {"i": {"type": "array", "items": SMALL, "maxItems": 2}}}},
    },
    {
        "type": "object",
        "properties": {"lvl": {"type": "integer", "enum": [1, 2, 3]}, "note": NAME},
        "required": ["lvl"],
    },
]


@pytest.fixture(scope="module")
def llms(checkpoint):
    """`llms(arch)`: one LLM per family for the module (compiling is most of a test's time)."""
    built: dict[str, LLM] = {}

    def get(arch: str) -> LLM:
        if arch not in built:
            built[arch] = LLM(str(checkpoint(arch)), num_kv_blocks=256, block_size=16)
        return built[arch]

    return get


def _params(i: int, **structured) -> SamplingParams:
    """Greedy for even rows, seeded sampling for odd ones."""
    sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 1.0, "seed": i}
    return SamplingParams(max_tokens=96, structured_output=structured, **sampling)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_json_schema_output_parses_and_validates(llms, arch: str) -> None:
    llm = llms(arch)
    outs = llm.generate(
        [f"Answer {i}:" for i in range(len(SCHEMAS))], [_params(i, json=s) for i, s in enumerate(SCHEMAS)]
    )
    for schema, out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert out.error is None and c.finish_reason == "stop", (schema, c.text, c.finish_reason)
        jsonschema.validate(json.loads(c.text), schema)
    assert llm.engine.grammars.num_compiled >= len(SCHEMAS)  # other tests may share this engine


def test_regex_choice_grammar_and_json_object(llms) -> None:
    llm = llms("llama")
    regex = r"\d{3}-[a-z]{2,4}( ok)?"
    choices = ["yes", "no way", 'maybe "q"']
    specs = [
        {"regex": regex},
        {"choice": choices},
        {"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'},
        {"json_object": True},
        {"grammar": 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] [0-9]?'},  # GBNF
    ]
    outs = llm.generate(["x"] * 10, [_params(i, **specs[i % 5]) for i in range(10)])
    for i, out in enumerate(outs):
        text = out.outputs[0].text
        if i % 5 == 0:
            assert re.fullmatch(regex, text), text
        elif i % 5 == 1:
            assert text in choices
        elif i % 5 in (2, 4):
            assert re.fullmatch(r"\(\d{1,2}(,\d{1,2})*\)", text), text
        else:
            assert text.startswith("{"), text  # any object: it may run to max_tokens
        if i % 5 != 3:
            assert out.outputs[0].finish_reason == "stop"


def test_unconstrained_rows_keep_their_tokens_in_a_mixed_batch(llms, overlap: bool) -> None:
    llm = LLM(llms("llama").engine.model, num_kv_blocks=128, block_size=16)  # async scheduling per `overlap`
    assert llm.engine.async_scheduling == overlap
    plain = [
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.9, seed=7),
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=2),
    ]
    prompts = ["The kiln", "Once upon", "Clay and water"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    constrained = [_params(i, json=SCHEMAS[i]) for i in range(4)]
    mixed = llm.generate(prompts + ["a", "b", "c", "d"], plain + constrained)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    for schema, out in zip(SCHEMAS, mixed[3:]):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_invalid_specs_raise_value_errors_naming_structured_output(llms) -> None:
    llm = llms("llama")
    for bad in ({"json": {"type": "objectx"}}, {"regex": "a(b"}, {"grammar": "start: ("}, {"grammar": "root ::= ("}):
        with pytest.raises(ValueError, match=r"^structured_output has an invalid"):
            llm.generate(["x"], SamplingParams(structured_output=bad))
    for bad in ({}, {"json": {}, "regex": "a"}, {"choice": []}, {"json": "{nope"}, {"schema": {}}):
        with pytest.raises(ValueError, match="structured_output"):
            SamplingParams(structured_output=bad)
    assert llm.generate(["x"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].finish_reason == "length"


def test_a_grammar_that_dead_ends_fails_its_request_alone(llms) -> None:
    """min_tokens holds back the EOS that is the grammar's only way on: that request fails, the others go on."""
    llm = llms("llama")
    doomed = SamplingParams(max_tokens=8, min_tokens=4, temperature=0, structured_output=StructuredOutput(choice=["a"]))
    fine = SamplingParams(max_tokens=8, temperature=0)
    outs = llm.generate(["x", "y"], [doomed, fine])
    assert outs[0].outputs[0].finish_reason == "abort" and "grammar" in (outs[0].error or "")
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 8


def test_n_sequences_and_a_cached_grammar(llms) -> None:
    llm = llms("llama")
    schema = SCHEMAS[1]
    params = SamplingParams(n=3, max_tokens=64, temperature=1.0, seed=3, structured_output={"json": schema})
    for out in llm.generate(["p", "q"], params):
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), schema)
    before = llm.engine.grammars.num_compiled
    llm.generate(["r"], params)
    assert llm.engine.grammars.num_compiled == before  # compiled once, then served from the cache


@pytest.mark.parametrize("table", [False, True], ids=["numpy", "device-table"])
def test_the_bitmask_unpacks_to_the_right_tokens(table: bool) -> None:
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    expected = [[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 == 1 for t in range(100)] for r in range(3)]
    assert allowed_tokens(bitmask, 100, torch.device("cpu"), table).tolist() == expected

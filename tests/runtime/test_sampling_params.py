"""SamplingParams validation: every bad value is a ValueError that names the parameter."""

from __future__ import annotations

import pytest

from kiln.runtime.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingParams

BAD_VALUES = [
    ("n", 0),
    ("n", MAX_N + 1),
    ("n", 1.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", "16"),
    ("min_tokens", -1),
    ("temperature", -0.1),
    ("temperature", 1000.0),
    ("temperature", float("nan")),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -1.0),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("presence_penalty", 2.5),
    ("presence_penalty", -3.0),
    ("frequency_penalty", 2.1),
    ("frequency_penalty", -2.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("seed", 1.5),
    ("seed", "x"),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", -1),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "eos"),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_value_names_the_parameter(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_cannot_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


@pytest.mark.parametrize("stop", [["x"] * (MAX_STOP_STRINGS + 1), ["ok", "y" * 10_000], [""], 42])
def test_bad_stop(stop: object) -> None:
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=stop)


def test_stop_is_normalised_to_a_list() -> None:
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert SamplingParams().stop_strings == []


def test_from_dict_rejects_unknown_keys_by_name() -> None:
    with pytest.raises(ValueError, match="tempreature"):
        SamplingParams.from_dict({"tempreature": 0.5, "max_tokens": 3})
    params = SamplingParams.from_dict({"temperature": 0, "max_tokens": 3, "stop": "x"})
    assert params.greedy and params.max_tokens == 3 and params.stop_strings == ["x"]


def test_from_dict_still_validates_values() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0})


def test_edge_values_are_accepted() -> None:
    params = SamplingParams(
        temperature=0,
        top_p=1,
        top_k=0,
        min_p=1,
        presence_penalty=-2,
        frequency_penalty=2,
        logprobs=MAX_LOGPROBS,
        n=MAX_N,
        seed=0,
    )
    assert params.greedy and params.has_penalties and isinstance(params.temperature, float)

"""How one request wants its tokens chosen and when it wants generation to stop (vLLM's `SamplingParams`).

Every value is checked at construction so that a bad request fails when it is added, with a ValueError that
names the offending parameter, instead of failing mid-batch and taking other requests down with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .structured_output import StructuredOutput

MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TEMPERATURE = 100.0
MAX_TOKENS_CAP = 1 << 20
# Temperatures below this are greedy (vLLM's choice too): dividing logits by less overflows float32.
SAMPLING_EPS = 1e-5


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # rejects NaN


@dataclass
class SamplingParams:
    """Per-request sampling and stopping options; temperature below SAMPLING_EPS (1e-5) means greedy."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    # OpenAI's: token id -> a bias in [-100, 100] added to its logit before sampling (greedy included).
    logit_bias: dict[int, float] | None = None
    # vLLM's: the logprob of every prompt token after the first, with the top-k (0: the token's own only).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # The output's required shape (JSON schema, regex, choice, grammar); a dict of StructuredOutput's fields works.
    structured_output: StructuredOutput | dict[str, Any] | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_ints()
        self._check_floats()
        self._check_stops()
        self._check_logit_bias()
        self.structured_output = StructuredOutput.coerce(self.structured_output)

    def _check_ints(self) -> None:
        def need_int(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")

        need_int("n", 1, MAX_N)
        need_int("max_tokens", 1, MAX_TOKENS_CAP)
        need_int("min_tokens", 0, self.max_tokens)
        need_int("top_k", -1, 1 << 31)
        if self.seed is not None:
            need_int("seed", -(1 << 63), (1 << 63) - 1)
        if self.logprobs is not None:
            need_int("logprobs", 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            need_int("prompt_logprobs", 0, MAX_LOGPROBS)
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_floats(self) -> None:
        def need_float(name: str, low: float, high: float, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = _is_number(value) and (value > low if low_open else value >= low) and value <= high
            if not ok:
                bracket = "(" if low_open else "["
                raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")
            setattr(self, name, float(value))

        need_float("temperature", 0.0, MAX_TEMPERATURE)
        need_float("top_p", 0.0, 1.0, low_open=True)
        need_float("min_p", 0.0, 1.0)
        need_float("presence_penalty", -2.0, 2.0)
        need_float("frequency_penalty", -2.0, 2.0)
        need_float("repetition_penalty", 0.0, 2.0**31, low_open=True)

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, (list, tuple)):
            stops = list(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
        for s in stops:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(
                    f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_LEN} characters, got {s!r:.80}"
                )
        self._stop_list = stops
        ids = self.stop_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or len(ids) > MAX_STOP_TOKEN_IDS:
                raise ValueError(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
            if not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids must hold non-negative integers, got {list(ids)!r:.80}")
            self.stop_token_ids = list(ids)

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} token ids to biases")
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {token!r:.40}")
            if not _is_number(value) or not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r:.40}")
        self.logit_bias = {int(t): float(v) for t, v in bias.items()} or None

    @property
    def stop_strings(self) -> list[str]:
        """`stop` normalised to a list."""
        return self._stop_list

    @property
    def structure(self) -> StructuredOutput | None:
        """`structured_output` as normalised at construction (a dict became a StructuredOutput)."""
        assert not isinstance(self.structured_output, dict)
        return self.structured_output

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SamplingParams:
        """Build from a user-supplied mapping (e.g. a JSON request), refusing unknown keys by name."""
        if not isinstance(options, dict):
            raise ValueError(f"sampling options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(str(k) for k in options if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**options)

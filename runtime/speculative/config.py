"""`speculative_config` in vLLM's shape, checked up front so that a bad one fails with the field it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
_FIELDS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"},
    "draft_model": {"method", "num_speculative_tokens", "model"},
}


def _positive_int(config: dict, name: str, default: int | None, high: int) -> int:
    value = config.get(name, default)
    if value is None:
        raise ValueError(f"speculative_config.{name} is required")
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ValueError(f"speculative_config.{name} must be an integer in [1, {high}], got {value!r}")
    return value


@dataclass(frozen=True)
class SpeculativeConfig:
    """method "ngram": propose the k tokens that followed the latest earlier occurrence of the context's last
    n tokens (prompt_lookup_max >= n >= prompt_lookup_min, longest first). method "draft_model": a smaller
    model of the same vocabulary (a checkpoint directory or a compiled model) proposes k tokens greedily."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: Any = None

    @classmethod
    def from_dict(cls, config: Any) -> SpeculativeConfig:
        if isinstance(config, SpeculativeConfig):
            return config
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
        method = config.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}; got {method!r}")
        unknown = sorted(set(config) - _FIELDS[method])
        if unknown:
            raise ValueError(f"speculative_config has fields that method {method!r} does not take: {unknown}")
        k = _positive_int(config, "num_speculative_tokens", None, MAX_SPECULATIVE_TOKENS)
        if method == "draft_model":
            model = config.get("model")
            if model is None or (isinstance(model, str) and not model):
                raise ValueError("speculative_config.model is required for method 'draft_model'")
            return cls(method, k, model=model)
        high = _positive_int(config, "prompt_lookup_max", 4, 64)
        low = _positive_int(config, "prompt_lookup_min", 1, 64)
        if low > high:
            raise ValueError(f"speculative_config.prompt_lookup_min ({low}) must be <= prompt_lookup_max ({high})")
        return cls(method, k, prompt_lookup_max=high, prompt_lookup_min=low)

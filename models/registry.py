"""Which Hugging Face architectures kiln compiles, and the few facts about them the compiler cannot read
from the graph. Capture and rewrite are generic: a family here is only a declaration, never capture code."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or config is outside what kiln compiles."""


@dataclass(frozen=True)
class Family:
    """What kiln knows about one `config.model_type`.

    attn_implementation: the HF attention form to export with ("sdpa" where the model supports it; "eager" for
    models whose score modifiers, such as logit soft-capping, only exist in the eager form). Both forms are
    rewritten by passes/paged_attention.py.
    """

    model_type: str
    attn_implementation: str = "sdpa"


# Each entry is exercised by tests/compiler against HF's own forward and generate.
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("llama"),
        Family("mistral"),
        Family("qwen2"),
        Family("qwen3"),
        Family("phi3"),
        Family("phi"),
        Family("gemma"),
        Family("gemma2", attn_implementation="eager"),
        Family("gpt2"),
        Family("gpt_neox"),
        Family("starcoder2"),
        Family("olmo"),
        Family("olmo2"),
        Family("stablelm"),
        Family("granite"),
    ]
}

# Rope variants whose frequencies depend only on the config, not on the batch being run.
_STATIC_ROPE = {None, "default", "linear", "llama3", "yarn", "longrope"}


def family_for(config: PretrainedConfig) -> Family:
    """The family of a config, or UnsupportedModelError naming what is wrong."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"unsupported architecture: model_type {model_type!r} ({getattr(config, 'architectures', None)}); "
            f"kiln supports: {supported}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"unsupported config: {model_type} is an encoder-decoder model")
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in _STATIC_ROPE:
        raise UnsupportedModelError(
            f"unsupported config: rope type {rope_type!r} rescales with the sequence length at run time"
        )
    return FAMILIES[model_type]


def layer_windows(config: PretrainedConfig) -> list[int]:
    """Sliding-window size of each decoder layer (0 = full attention), as HF's masks apply it."""
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else 0 for t in layer_types]
    if getattr(config, "use_sliding_window", True) is False:
        return [0] * num_layers
    return [window] * num_layers

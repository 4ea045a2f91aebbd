"""Load an HF causal LM (a local directory or a PreTrainedModel) the way kiln captures it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from .device import DeviceLike, resolve_device
from .registry import Family, UnsupportedModelError, family_for
from .weights import load_safetensors_model

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    family: Family
    tokenizer: object | None
    generation_config: GenerationConfig | None
    source: str
    prequantized: Any = None  # models/prequantized.Prequantized: a GPTQ / AWQ checkpoint's packed weights


def _resolve_dtype(dtype: str | torch.dtype | None, config_dtype: object) -> torch.dtype:
    """None keeps the checkpoint's dtype (float32 when it records none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype is not None else config_dtype
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        None: torch.float32,
        "auto": torch.float32,
    }
    if name not in table:
        raise ValueError(f"dtype: unsupported value {name!r}; use float32, float16 or bfloat16")
    return table[name]


def load_model(
    model: str | Path | PreTrainedModel,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: DeviceLike = "auto",
) -> LoadedModel:
    """Load and check a model onto `device`; errors name the missing file or unsupported feature.

    A checkpoint directory's weights go from safetensors straight onto the device, with no CPU copy on the way.
    A PreTrainedModel stays where it is under "auto" and moves to any other device asked for.
    """
    if isinstance(model, PreTrainedModel):
        family = family_for(model.config)
        target = _resolve_dtype(dtype, model.dtype)
        where = model.device if device in (None, "auto") else resolve_device(device)
        moved: Any = model  # transformers types `to` through a wrapper that mypy cannot call
        moved = moved.to(device=where, dtype=target)
        moved.eval().set_attn_implementation(family.attn_implementation)
        return LoadedModel(moved, family, None, getattr(moved, "generation_config", None), type(moved).__name__)

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is not a directory (kiln loads local HF checkpoints only)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {path} has no config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"model: {path} has no weights (expected one of {', '.join(_WEIGHT_FILES)})")
    where = resolve_device(device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config)
    target = _resolve_dtype(dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    prequantized = None
    hf: Any
    if getattr(config, "quantization_config", None) is not None:  # GPTQ / AWQ, converted on the CPU, then moved
        from .prequantized import load_prequantized

        hf, prequantized = load_prequantized(path, config, target, family.attn_implementation)
        hf = hf.to(where)
    else:
        hf = load_safetensors_model(path, config, target, family.attn_implementation, where)
    if hf is None:  # pytorch_model.bin or legacy tensor names: transformers reads it on the CPU, then it moves
        hf = AutoModelForCausalLM.from_pretrained(
            path, dtype=target, attn_implementation=family.attn_implementation, trust_remote_code=trust_remote_code
        )
        hf = hf.to(where).eval()
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    generation_config = None
    if (path / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(path)
    return LoadedModel(hf, family, tokenizer, generation_config, str(path), prequantized)


__all__ = ["LoadedModel", "UnsupportedModelError", "load_model"]

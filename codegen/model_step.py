"""One step of a model at its real sizes, and the launches each kernel plan makes in it.

Each plan in kernels/ declares with `@at_model_size` the launches its launcher makes in one step (planned on
`meta` tensors: shapes and dtypes only, as the launcher plans them for the step's target). The cross-compile
check collects them from every plan, so a new kernel is compiled for every target by declaring its hook in its
own plan rather than by editing a list here. This is what a config alone tells (the checks at a 1B or 8B
model's sizes); an artifact compiles what its own forward launches instead (graph_launches.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels
from .kernel_plan import Launch, Target

MAX_BLOCKS_PER_SEQ = 512  # block-table width: only a stride, the kernels take any


@dataclass(frozen=True)
class ModelShapes:
    """The sizes kernels are specialised and sized for, read from an HF config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rotary_dim: int
    act: str
    weight_offset: float
    window: int
    softcap: float
    max_positions: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShapes:
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        act = {"silu": "silu", "gelu": "gelu"}.get(get("hidden_act", "silu"), "gelu_tanh")
        model_type = get("model_type", "")
        return cls(
            get("hidden_size"),
            heads,
            get("num_key_value_heads") or heads,
            head_dim,
            get("intermediate_size"),
            int(head_dim * (get("partial_rotary_factor") or 1.0)),
            act,
            1.0 if str(model_type).startswith("gemma") else 0.0,
            int(get("sliding_window") or 0),
            float(get("attn_logit_softcapping") or 0.0),
            min(int(get("max_position_embeddings", 4096)), 1 << 20),
        )


@dataclass(frozen=True)
class ModelStep:
    """One step of a model as its launchers see it: `seqs` sequences of `query_len` new tokens each, on
    `target`; `quantized` adds the quantized linears."""

    shapes: ModelShapes
    dtype: torch.dtype
    target: Target
    name: str
    seqs: int
    query_len: int
    block_size: int = 16
    quantized: bool = False

    @property
    def tokens(self) -> int:
        return self.seqs * self.query_len

    def tensor(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A `meta` tensor of the step's dtype (or `dtype`)."""
        return torch.empty(*shape, dtype=dtype or self.dtype, device="meta")


@dataclass
class Planned:
    """One launch of one step, with the bound of the config it was chosen by (None: no choice made)."""

    kernel: str
    step: str
    launch: Launch
    shared_bound: int | None = None


Hook = Callable[[ModelStep], list[Planned]]
_HOOKS: dict[str, Hook] = {}  # plan module -> its launches in a step


def at_model_size(hook: Hook) -> Hook:
    """Declare `hook` as its plan's launches in one model step (one hook per plan module)."""
    if _HOOKS.setdefault(hook.__module__, hook) is not hook:
        raise ValueError(f"{hook.__module__} declares two hooks at model size")
    return hook


def step_launches(step: ModelStep) -> list[Planned]:
    """Every kernel launch of the step, from every plan in kernels/ (each imported here), by plan name."""
    for module in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"{kernels.__name__}.{module.name}")
    return [p for _, hook in sorted(_HOOKS.items()) for p in hook(step)]

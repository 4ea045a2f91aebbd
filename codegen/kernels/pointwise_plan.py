"""Plan of pointwise.py.jinja: a fused chain of elementwise ops over row-major inputs, optionally reduced
per row (sum or max). The chain is one Triton expression over the input names, scalar names and the helpers
of activations.jinja (silu, gelu, gelu_tanh, tanh, relu), e.g. "silu(a) * b + 0.5 * c"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernel_plan import Config, Launch, cdiv, next_pow2
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, Repeat, const, ptr, scalar

KERNEL = Kernel(
    "pointwise",
    "kernel",
    (
        Repeat("inputs", (ptr("{}_ptr"), scalar("{}_stride"))),
        ptr("out_ptr"),
        scalar("out_stride"),
        scalar("n_cols"),
        Repeat("scalars", (scalar("{}"),)),
        const("BLOCK"),
    ),
)
REDUCTIONS = ("none", "sum", "max")


@dataclass(frozen=True)
class Chain:
    """The fused expression: input tensor names, scalar names, the expression, the row reduction."""

    inputs: tuple[str, ...]
    expr: str
    scalars: tuple[str, ...] = ()
    reduce: str = "none"


def config(n_cols: int, reduce: str) -> Config:
    block = next_pow2(n_cols) if reduce != "none" else min(1024, next_pow2(n_cols))
    return Config({"BLOCK": block}, num_warps=min(8, max(1, block // 256)))


def plan(chain: Chain, tensors: dict[str, torch.Tensor], scalars: dict[str, float], out: torch.Tensor) -> Launch:
    """tensors [rows, cols] by input name; out [rows, cols], or [rows] when the chain reduces."""
    if chain.reduce not in REDUCTIONS:
        raise ValueError(f"reduce: {chain.reduce!r} is not one of {', '.join(REDUCTIONS)}")
    rows, cols = tensors[chain.inputs[0]].shape
    cfg = config(cols, chain.reduce)
    args: dict[str, object] = {"out_ptr": out, "out_stride": out.stride(0), "n_cols": cols, **cfg.blocks}
    for name in chain.inputs:
        args.update({f"{name}_ptr": tensors[name], f"{name}_stride": tensors[name].stride(0)})
    args.update({name: float(scalars[name]) for name in chain.scalars})
    flags = {"inputs": list(chain.inputs), "scalars": list(chain.scalars), "expr": chain.expr, "reduce": chain.reduce}
    grid = (rows, 1 if chain.reduce != "none" else cdiv(cols, cfg.blocks["BLOCK"]))
    return Launch(KERNEL, flags, args, grid, cfg.num_warps, cfg.num_stages)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """A two-input chain over the step's hidden states (what region fusion typically emits)."""
    x = step.tensor(step.tokens, step.shapes.hidden)
    add_mul = Chain(("a", "b"), "a + b * alpha", ("alpha",))
    return [Planned("pointwise_add_mul", step.name, plan(add_mul, {"a": x, "b": x}, {"alpha": 1.0}, x))]

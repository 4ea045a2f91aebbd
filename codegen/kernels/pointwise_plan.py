"""Plan of pointwise.py.jinja: a fused chain of elementwise ops over [rows, cols] inputs (strided, so that one
broadcasts), optionally reduced per row (sum or max). The chain is one Triton expression over the input names,
scalar names and the helpers of activations.jinja (silu, gelu, gelu_tanh, tanh, relu), e.g. "silu(a) * b + 0.5 *
c". Its launcher `region` runs the regions of passes/fuse_regions.py that codegen/regions.py lowers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch

from ..kernel_plan import Config, Launch, cdiv, next_pow2, run
from ..lowerings import lowers
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, Repeat, const, ptr, scalar

KERNEL = Kernel(
    "pointwise",
    "kernel",
    (
        Repeat("inputs", (ptr("{}_ptr"), scalar("{}_stride"), scalar("{}_cstride"))),
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
    """tensors [rows, cols] by input name (any strides: 0 broadcasts); out [rows, cols], or [rows] when the chain
    reduces."""
    if chain.reduce not in REDUCTIONS:
        raise ValueError(f"reduce: {chain.reduce!r} is not one of {', '.join(REDUCTIONS)}")
    rows, cols = tensors[chain.inputs[0]].shape
    cfg = config(cols, chain.reduce)
    args: dict[str, object] = {"out_ptr": out, "out_stride": out.stride(0), "n_cols": cols, **cfg.blocks}
    for name in chain.inputs:
        t = tensors[name]
        args.update({f"{name}_ptr": t, f"{name}_stride": t.stride(0), f"{name}_cstride": t.stride(1)})
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


@dataclass(frozen=True)
class RegionSpec:
    """A fused region as codegen/regions.py lowers it: its chain over inputs x0..xN and its output's dtype."""

    chain: Chain
    keepdim: bool
    dtype: torch.dtype


@cache
def region_spec(spec: str) -> RegionSpec:
    """The spec string a lowered region node carries (plain JSON, so that artifacts store it as data)."""
    data = json.loads(spec)
    chain = Chain(tuple(f"x{i}" for i in range(data["inputs"])), data["expr"], (), data["reduce"])
    return RegionSpec(chain, data["keepdim"], getattr(torch, data["dtype"]))


def _rows(t: torch.Tensor, shape: torch.Size, rows: int, cols: int) -> torch.Tensor:
    """`t` broadcast to `shape`, seen as [rows, cols]: a strided view (0 strides where it broadcasts) when its
    leading dims flatten into one row index, else a contiguous copy."""
    e = t.expand(shape)
    lead = [(n, s) for n, s in zip(shape[:-1], e.stride()[:-1]) if n != 1]
    if all(s == s2 * n2 for (_, s), (n2, s2) in zip(lead, lead[1:])):
        row = lead[-1][1] if lead else 0
        return torch.as_strided(e, (rows, cols), (row, e.stride(-1) if e.dim() else 0))
    return e.contiguous().view(rows, cols)


def region_launch(spec: str, inputs: list[torch.Tensor]) -> tuple[Launch, torch.Tensor]:
    """The launch of one region over these inputs (real, or `meta` ones at a model's size), and its output."""
    parsed = region_spec(spec)
    shape = torch.broadcast_shapes(*(t.shape for t in inputs))
    cols = shape[-1] if len(shape) else 1
    rows = shape.numel() // cols if cols else 0
    views = {name: _rows(t, shape, rows, cols) for name, t in zip(parsed.chain.inputs, inputs)}
    reduce = parsed.chain.reduce != "none"
    out_shape = (*shape[:-1], 1) if reduce and parsed.keepdim else shape[:-1] if reduce else shape
    out = torch.empty(out_shape, dtype=parsed.dtype, device=inputs[0].device)
    return plan(parsed.chain, views, {}, out.view(rows) if reduce else out.view(rows, cols)), out


@lowers("kiln.region")
def region(spec: str, *inputs: torch.Tensor) -> torch.Tensor:
    """One fused region (passes/fuse_regions.py) as one generated kernel: the inputs broadcast together, the
    chain applied, reduced over the last dim when the region ends with a reduction."""
    launch, out = region_launch(spec, list(inputs))
    if out.numel():
        run(launch)
    return out

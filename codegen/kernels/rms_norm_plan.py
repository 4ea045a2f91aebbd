"""Plan of rms_norm.py.jinja: kiln::rms_norm and kiln::add_rms_norm, one row per program (Liger style: the
whole row in one tile of the next power of two, so one read and one write per element)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_plan import Config, Launch, next_pow2, run
from ..lowerings import as_rows, lowers
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, const, ptr, scalar

KERNEL = Kernel(
    "rms_norm",
    "kernel",
    (
        ptr("x_ptr"),
        ptr("weight_ptr"),
        ptr("out_ptr"),
        ptr("res_ptr", "residual"),
        ptr("res_out_ptr", "residual"),
        scalar("n_cols"),
        scalar("x_stride"),
        scalar("out_stride"),
        scalar("res_stride", "residual"),
        scalar("res_out_stride", "residual"),
        scalar("eps"),
        const("BLOCK"),
    ),
)


def config(n_cols: int) -> Config:
    """More warps for wider rows: about 8 elements per thread up to 16 warps."""
    block = next_pow2(n_cols)
    return Config({"BLOCK": block}, num_warps=min(16, max(1, block // 256)))


def plan(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    weight_offset: float,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> Launch:
    """x, residual, out, residual_out: [rows, cols] with unit column stride."""
    rows, cols = x.shape
    args = {
        "x_ptr": x,
        "weight_ptr": weight,
        "out_ptr": out,
        "n_cols": cols,
        "x_stride": x.stride(0),
        "out_stride": out.stride(0),
        "eps": float(eps),
    }
    if residual is not None and residual_out is not None:
        args.update(
            res_ptr=residual,
            res_out_ptr=residual_out,
            res_stride=residual.stride(0),
            res_out_stride=residual_out.stride(0),
        )
    cfg = config(cols)
    flags = {"residual": residual is not None, "weight_offset": float(weight_offset)}
    return Launch(KERNEL, flags, {**args, **cfg.blocks}, (rows,), cfg.num_warps, cfg.num_stages)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """rms_norm and add_rms_norm over the step's hidden states."""
    x, w = step.tensor(step.tokens, step.shapes.hidden), step.tensor(step.shapes.hidden)
    offset = step.shapes.weight_offset
    return [
        Planned("rms_norm", step.name, plan(x, w, x, 1e-5, offset)),
        Planned("add_rms_norm", step.name, plan(x, w, x, 1e-5, offset, x, x)),
    ]


# The launcher: the op's exact contract, called by backend "triton" in place of the op ---------------


@lowers("kiln.rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> Tensor:
    """kiln::rms_norm."""
    x2 = as_rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    run(plan(x2, weight, out.view(-1, x.shape[-1]), eps, weight_offset))
    return out


@lowers("kiln.add_rms_norm")
def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float
) -> tuple[Tensor, Tensor]:
    """kiln::add_rms_norm: (rms_norm(x + residual), x + residual)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cols = x.shape[-1]
    run(plan(as_rows(x), weight, out.view(-1, cols), eps, weight_offset, as_rows(residual), res_out.view(-1, cols)))
    return out, res_out

"""Plan of gated_act.py.jinja: kiln::silu_mul and kiln::gelu_mul (act flag: silu, gelu, gelu_tanh) on the
fused gate/up projection [T, 2I] -> [T, I]; a 2-D grid of rows × column tiles keeps every SM busy at decode."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_plan import Config, Launch, cdiv, next_pow2, run
from ..lowerings import as_rows, lowers
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, const, ptr, scalar

KERNEL = Kernel(
    "gated_act",
    "kernel",
    (
        ptr("gate_up_ptr"),
        ptr("out_ptr"),
        scalar("n_cols"),
        scalar("in_stride"),
        scalar("out_stride"),
        const("BLOCK"),
    ),
)
ACTS = {"silu": "kiln::silu_mul", "gelu": "kiln::gelu_mul", "gelu_tanh": "kiln::gelu_mul"}  # act -> reference


def config(n_cols: int) -> Config:
    return Config({"BLOCK": min(1024, next_pow2(n_cols))}, num_warps=4)


def plan(gate_up: torch.Tensor, out: torch.Tensor, act: str) -> Launch:
    """gate_up [rows, 2 * cols] and out [rows, cols], unit column stride."""
    if act not in ACTS:
        raise ValueError(f"act: {act!r} is not one of {', '.join(ACTS)}")
    rows, cols = out.shape
    cfg = config(cols)
    args = {
        "gate_up_ptr": gate_up,
        "out_ptr": out,
        "n_cols": cols,
        "in_stride": gate_up.stride(0),
        "out_stride": out.stride(0),
        **cfg.blocks,
    }
    return Launch(KERNEL, {"act": act}, args, (rows, cdiv(cols, cfg.blocks["BLOCK"])), cfg.num_warps, cfg.num_stages)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """The model's gated activation over the step's gate/up projection."""
    s, t = step.shapes, step.tokens
    return [
        Planned(
            f"{s.act}_mul", step.name, plan(step.tensor(t, 2 * s.intermediate), step.tensor(t, s.intermediate), s.act)
        )
    ]


# The launcher: the op's exact contract, called by backend "triton" in place of the op ---------------


def _gated(gate_up: Tensor, act: str) -> Tensor:
    cols = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], cols, dtype=gate_up.dtype, device=gate_up.device)
    run(plan(as_rows(gate_up), out.view(-1, cols), act))
    return out


@lowers("kiln.silu_mul")
def silu_mul(gate_up: Tensor) -> Tensor:
    """kiln::silu_mul."""
    return _gated(gate_up, "silu")


@lowers("kiln.gelu_mul")
def gelu_mul(gate_up: Tensor, approximate: str) -> Tensor:
    """kiln::gelu_mul."""
    return _gated(gate_up, "gelu_tanh" if approximate == "tanh" else "gelu")

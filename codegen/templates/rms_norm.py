"""Descriptor of rms_norm.py.jinja: kiln::rms_norm and kiln::add_rms_norm, one row per program (Liger style:
the whole row in one tile of the next power of two, so one read and one write per element)."""
from __future__ import annotations

import torch

from kiln.codegen.launch import Config, Launch, next_pow2

TEMPLATE = "rms_norm"
REFERENCES = {False: "kiln::rms_norm", True: "kiln::add_rms_norm"}  # keyed by the `residual` flag


def config(n_cols: int) -> Config:
    """More warps for wider rows: about 8 elements per thread up to 16 warps."""
    block = next_pow2(n_cols)
    return Config({"BLOCK": block}, num_warps=min(16, max(1, block // 256)))


def plan(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float, weight_offset: float,
    residual: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> Launch:
    """x, residual, out, residual_out: [rows, cols] with unit column stride."""
    rows, cols = x.shape
    fused = residual is not None
    args = [("x_ptr", x), ("weight_ptr", weight), ("out_ptr", out)]
    if fused:
        args += [("res_ptr", residual), ("res_out_ptr", residual_out)]
    args += [("n_cols", cols), ("x_stride", x.stride(0)), ("out_stride", out.stride(0))]
    if fused:
        args += [("res_stride", residual.stride(0)), ("res_out_stride", residual_out.stride(0))]
    args.append(("eps", float(eps)))
    cfg = config(cols)
    return Launch(TEMPLATE, {"residual": fused, "weight_offset": float(weight_offset)}, args, dict(cfg.blocks),
                  (rows,), cfg.num_warps, cfg.num_stages)

"""Plan of matmul.py.jinja: a GEMM with a fused epilogue (bias, activation, residual add, cast). The
backend leaves plain GEMMs on torch (cuBLAS); this template is for epilogues worth fusing and for targets
without a vendor BLAS."""

from __future__ import annotations

import torch

from ..kernel_plan import Config, Launch, Target, cdiv, ieee_dots, pick
from ..model_step import ModelStep, Planned, at_model_size
from ..render import interpreting
from ..signature import Kernel, const, ptr, scalar, size

KERNEL = Kernel(
    "matmul",
    "kernel",
    (
        ptr("a_ptr"),
        ptr("b_ptr"),
        ptr("c_ptr"),
        ptr("bias_ptr", "bias"),
        ptr("res_ptr", "residual"),
        scalar("res_stride_m", "residual"),
        size("M"),
        scalar("N"),
        scalar("K"),
        scalar("a_stride_m"),
        scalar("b_stride_n"),
        scalar("c_stride_m"),
        const("BLOCK_M"),
        const("BLOCK_N"),
        const("BLOCK_K"),
        const("GROUP_M"),
    ),
)
ACTIVATIONS = {
    "none": lambda x: x,
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def reference(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The epilogue GEMM in float32, cast once (what the kernel computes)."""
    c = a.float() @ b.float().T
    if bias is not None:
        c = c + bias.float()
    c = ACTIVATIONS[activation](c)
    if residual is not None:
        c = c + residual.float()
    return c.to(out_dtype)


def configs(m: int, dtype: torch.dtype) -> list[Config]:
    """Candidates best first: wide tiles for prefill, 16-row tiles (tl.dot's minimum) for decode. float32 dots
    are IEEE, on the FMA units with operands in registers: short K tiles, or they spill."""
    if ieee_dots(dtype):
        shapes = [(16, 64, 64, 4, 2)] if m <= 16 else [(64, 128, 16, 8, 3), (64, 64, 32, 4, 2)]
    else:
        shapes = (
            [(16, 128, 64, 4, 4), (16, 64, 128, 4, 3)]
            if m <= 16
            else [(128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (64, 128, 64, 4, 3)]
        )
    # num_stages buffers of the A and B tiles, or the float32 accumulator's layout conversion in the epilogue
    # (after the loop, in the same space).
    return [
        Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            warps,
            stages,
            max(stages * (bm + bn) * bk * dtype.itemsize, bm * bn * 4),
        )
        for bm, bn, bk, warps, stages in shapes
    ]


def choose(m: int, dtype: torch.dtype, target: Target) -> Config:
    """The config an [m, K] x [K, N] launch runs with on `target` (what the cross-compile check compiles)."""
    return pick(configs(m, dtype), target.shared_limit)


def plan(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    config: Config,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
) -> Launch:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    m, k = a.shape
    n = b.shape[0]
    flags = {
        "bias": bias is not None,
        "residual": residual is not None,
        "activation": activation,
        "upcast": interpreting() and a.dtype == torch.bfloat16,
        "ieee": ieee_dots(a.dtype),
    }
    args = {
        "a_ptr": a,
        "b_ptr": b,
        "c_ptr": c,
        "M": m,
        "N": n,
        "K": k,
        "a_stride_m": a.stride(0),
        "b_stride_n": b.stride(0),
        "c_stride_m": c.stride(0),
        **config.blocks,
    }
    if bias is not None:
        args["bias_ptr"] = bias
    if residual is not None:
        args.update(res_ptr=residual, res_stride_m=residual.stride(0))
    grid = (cdiv(m, config.blocks["BLOCK_M"]) * cdiv(n, config.blocks["BLOCK_N"]),)
    return Launch(KERNEL, flags, args, grid, config.num_warps, config.num_stages)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """The fused QKV projection and the down projection with its residual add, at the step's token count."""
    s, t = step.shapes, step.tokens
    out = []
    for name, n, k, residual in (
        ("matmul_qkv", (s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden, None),
        ("matmul_down_residual", s.hidden, s.intermediate, step.tensor(t, s.hidden)),
    ):
        config = choose(t, step.dtype, step.target)
        a, b, c = step.tensor(t, k), step.tensor(n, k), step.tensor(t, n)
        out.append(Planned(name, step.name, plan(a, b, c, config, residual=residual), config.shared_bytes))
    return out

"""Plan of quant_matmul.py.jinja: dequantizing matmuls over int8 / int4 (GPTQ layout) weights and the scaled
int8 x int8 matmul of W8A8 with its per-token activation quantizer. Decode (small M) splits K so that a few
output tiles still fill the GPU. `choose` is the launchers' choice of config and split, which the cross-compile
check reproduces for each target."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernel_plan import Config, Launch, Target, cdiv, device_target, ieee_dots, next_pow2, pick, run
from ..lowerings import as_rows, lowers
from ..model_step import ModelStep, Planned, at_model_size
from ..signature import Kernel, const, ptr, scalar, size

KERNEL = Kernel(
    "quant_matmul",
    "kernel",
    (
        ptr("a_ptr"),
        ptr("w_ptr"),
        ptr("scale_ptr"),
        ptr("c_ptr"),
        ptr("a_scale_ptr", ("weight", "w8a8")),
        ptr("zeros_ptr", "zero_point"),
        ptr("in_scale_ptr", "input_scale"),
        ptr("bias_ptr", "bias"),
        size("M"),
        scalar("N"),
        scalar("K"),
        scalar("a_stride_m"),
        scalar("c_stride_m"),
        size("SPLIT_K"),
        const("BLOCK_M"),
        const("BLOCK_N"),
        const("BLOCK_K"),
        const("GROUP_SIZE"),
    ),
)
QUANTIZE_ROWS = Kernel(
    "quant_matmul",
    "quantize_rows",
    (
        ptr("x_ptr"),
        ptr("in_scale_ptr", "input_scale"),
        ptr("q_ptr"),
        ptr("s_ptr"),
        scalar("K"),
        scalar("x_stride_m"),
        const("BLOCK"),
    ),
)
MODES = ("int8", "int4", "w8a8")
MODEL_GROUP_SIZE = 128  # int4's group size in the model-size launches the cross-compile check compiles


def configs(m: int, mode: str, dtype: torch.dtype, zero_point: bool = False) -> list[Config]:
    """Candidates best first for activations of `dtype`: 16-row tiles (tl.dot's minimum) for decode, wider ones
    for prefill. The weight-only modes dequantize to float32 and multiply in IEEE float32 for float32
    activations, on the FMA units with operands in registers: small tiles, or they spill."""
    if ieee_dots(dtype) and mode != "w8a8":
        shapes = [(16, 64, 32, 8, 2)] if m <= 16 else [(32, 64, 32, 4, 2)]
    else:
        shapes = (
            [(16, 64, 128, 8, 3), (16, 64, 64, 4, 2), (16, 64, 32, 4, 2)]
            if m <= 16
            else [(64, 128, 64, 8, 3), (64, 128, 32, 8, 2), (64, 64, 32, 4, 3)]
        )
    return [
        Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            warps,
            stages,
            _shared_bytes(bm, bn, bk, stages, mode, dtype, zero_point),
        )
        for bm, bn, bk, warps, stages in shapes
    ]


def _shared_bytes(bm: int, bn: int, bk: int, stages: int, mode: str, dtype: torch.dtype, zero_point: bool) -> int:
    """Bound: num_stages buffers of every tile the loop loads (int4 loads its packed words, scales and zero
    points as full [BLOCK_K, BLOCK_N] int32/fp32 tiles) plus the dequantized fp32 tile staged for the dot; or
    the accumulator's layout conversion in the epilogue, after the loop in the same space."""
    if mode == "w8a8":
        loop = stages * (bm + bn) * bk
    else:
        weights = bk * bn * (4 * (3 if zero_point else 2) if mode == "int4" else 1)
        loop = stages * (bm * bk * dtype.itemsize + weights + 4 * bk) + 4 * bk * bn
    return max(loop, bm * bn * 4)


def split_k_for(m: int, n: int, k: int, config: Config, sms: int) -> int:
    """K splits for a decode-sized M: enough programs for every SM, each keeping at least 4 K tiles."""
    blocks = config.blocks
    tiles = cdiv(m, blocks["BLOCK_M"]) * cdiv(n, blocks["BLOCK_N"])
    if m > 16 or tiles >= sms:
        return 1
    return max(1, min(cdiv(sms, tiles), k // (4 * blocks["BLOCK_K"]), 16))


def choose(
    m: int, n: int, k: int, mode: str, dtype: torch.dtype, zero_point: bool, target: Target
) -> tuple[Config, int]:
    """The config and K splits an [m, k] x [k, n] launch runs with on `target` (split for its `split_sms`):
    what the quantized launchers launch and the cross-compile check compiles."""
    config = pick(configs(m, mode, dtype, zero_point), target.shared_limit)
    return config, split_k_for(m, n, k, config, target.split_sms)


def plan(
    a: Tensor,
    weight: Tensor,
    scales: Tensor,
    c: Tensor,
    mode: str,
    config: Config,
    split_k: int = 1,
    a_scale: Tensor | None = None,
    qzeros: Tensor | None = None,
    input_scale: Tensor | None = None,
    bias: Tensor | None = None,
    group_size: int = 128,
) -> Launch:
    """a [M, K] (int8 codes for w8a8, with a_scale [M]); c [M, N], fp32 and zeroed when split_k > 1."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    m, k = a.shape
    n = weight.shape[1] if mode == "int4" else weight.shape[0]
    flags = {
        "weight": mode,
        "zero_point": qzeros is not None,
        "input_scale": input_scale is not None,
        "bias": bias is not None,
        "split_k": split_k > 1,
        "ieee": ieee_dots(a.dtype),
    }
    args = {
        "a_ptr": a,
        "w_ptr": weight,
        "scale_ptr": scales,
        "c_ptr": c,
        "M": m,
        "N": n,
        "K": k,
        "a_stride_m": a.stride(0),
        "c_stride_m": c.stride(0),
        **config.blocks,
        "SPLIT_K": split_k,
        "GROUP_SIZE": group_size,
    }
    args.update(
        {
            name: t
            for name, t in (
                ("a_scale_ptr", a_scale),
                ("zeros_ptr", qzeros),
                ("in_scale_ptr", input_scale),
                ("bias_ptr", bias),
            )
            if t is not None
        }
    )
    grid = (cdiv(m, config.blocks["BLOCK_M"]) * cdiv(n, config.blocks["BLOCK_N"]), split_k)
    return Launch(KERNEL, flags, args, grid, config.num_warps, config.num_stages)


def plan_quantize_rows(x: Tensor, q: Tensor, scale: Tensor, input_scale: Tensor | None = None) -> Launch:
    """x [M, K] -> int8 codes q [M, K] and per-row scale [M]."""
    m, k = x.shape
    args = {"x_ptr": x, "q_ptr": q, "s_ptr": scale, "K": k, "x_stride_m": x.stride(0), "BLOCK": next_pow2(k)}
    if input_scale is not None:
        args["in_scale_ptr"] = input_scale
    flags = {
        "weight": "w8a8",
        "zero_point": False,
        "input_scale": input_scale is not None,
        "bias": False,
        "split_k": False,
        "ieee": False,
    }
    return Launch(QUANTIZE_ROWS, flags, args, (m,), num_warps=4, num_stages=1)


@at_model_size
def model_step_launches(step: ModelStep) -> list[Planned]:
    """When the step is quantized: the down projection in each mode (few output tiles: decode splits K) and
    W8A8's activation quantizer, at the step's token count, planned as the quantized launchers plan them."""
    if not step.quantized:
        return []
    m, n, k, group = step.tokens, step.shapes.hidden, step.shapes.intermediate, MODEL_GROUP_SIZE
    x = step.tensor(m, k)
    q8, s8 = step.tensor(n, k, dtype=torch.int8), step.tensor(n, dtype=torch.float32)
    q4, s4 = step.tensor(k // 8, n, dtype=torch.int32), step.tensor(k // group, n, dtype=torch.float32)
    z4, xs = step.tensor(k // group, n // 8, dtype=torch.int32), step.tensor(k, dtype=torch.float32)
    a_scale = step.tensor(m, dtype=torch.float32)
    out = []
    for name, mode, weight, scales, extra in (
        ("int8", "int8", q8, s8, {}),
        ("int4", "int4", q4, s4, {"input_scale": xs}),
        ("int4_zp", "int4", q4, s4, {"qzeros": z4}),
        ("w8a8", "w8a8", q8, s8, {"a_scale": a_scale}),
    ):
        config, split = choose(m, n, k, mode, step.dtype, "qzeros" in extra, step.target)
        a = step.tensor(m, k, dtype=torch.int8) if mode == "w8a8" else x
        c = step.tensor(m, n, dtype=torch.float32 if split > 1 else step.dtype)
        launch = plan(a, weight, scales, c, mode, config, split, group_size=group, **extra)
        out.append(Planned(f"quant_{name}", step.name, launch, config.shared_bytes))
    quantize = plan_quantize_rows(x, step.tensor(m, k, dtype=torch.int8), step.tensor(m, dtype=torch.float32))
    return out + [Planned("quantize_rows", step.name, quantize)]


# The launcher: the op's exact contract, called by backend "triton" in place of the op ---------------


def _quant_matmul(
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    mode: str,
    n: int,
    bias: Tensor | None = None,
    qzeros: Tensor | None = None,
    input_scale: Tensor | None = None,
    group_size: int = 128,
) -> Tensor:
    """Plan and run one quantized matmul over x [..., K] (rows flattened); returns [..., N] in x's dtype."""
    x2 = as_rows(x)
    m = x2.shape[0]
    config, split = choose(m, n, x2.shape[1], mode, x.dtype, qzeros is not None, device_target(x.device))
    a, a_scale = x2, None
    if mode == "w8a8":  # the activations' own int8 codes; input_scale is applied while quantizing them
        a = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        a_scale = torch.empty(m, dtype=torch.float32, device=x.device)
        run(plan_quantize_rows(x2, a, a_scale, input_scale))
        input_scale = None
    c = (
        torch.zeros(m, n, dtype=torch.float32, device=x.device)
        if split > 1
        else torch.empty(m, n, dtype=x.dtype, device=x.device)
    )
    run(plan(a, weight, scales, c, mode, config, split, a_scale, qzeros, input_scale, bias, group_size))
    return c.to(x.dtype).reshape(*x.shape[:-1], n)


@lowers("kiln.linear_int8")
def linear_int8(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """kiln::linear_int8."""
    return _quant_matmul(x, weight, scale, "int8", weight.shape[0], bias=bias)


@lowers("kiln.linear_w8a8")
def linear_w8a8(x: Tensor, weight: Tensor, scale: Tensor, input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """kiln::linear_w8a8."""
    return _quant_matmul(x, weight, scale, "w8a8", weight.shape[0], input_scale=input_scale, bias=bias)


@lowers("kiln.linear_int4")
def linear_int4(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    input_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
) -> Tensor:
    """kiln::linear_int4."""
    return _quant_matmul(
        x,
        qweight,
        scales,
        "int4",
        qweight.shape[1],
        qzeros=qzeros,
        input_scale=input_scale,
        bias=bias,
        group_size=group_size,
    )

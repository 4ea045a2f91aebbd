"""Descriptor of quant_matmul.py.jinja: dequantizing matmuls over int8 / int4 (GPTQ layout) weights and the
scaled int8 x int8 matmul of W8A8 with its per-token activation quantizer; plus launchers with the exact
contracts of kiln::linear_int8 / linear_w8a8 / linear_int4 (ops/quant.py), which backend "triton"
calls instead of the ops. Decode (small M) splits K so that a few output tiles still fill the GPU. `choose` is
the launchers' choice of config and split, which the cross-compile check reproduces for each target."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kiln.codegen.launch import Config, Launch, Target, cdiv, device_target, ieee_dots, next_pow2, pick, run

TEMPLATE = "quant_matmul"
MODES = ("int8", "int4", "w8a8")
SMS = 132  # H100 SXM: the number of programs a split-K grid aims for where the device is unknown


def configs(m: int, mode: str, dtype: torch.dtype, zero_point: bool = False) -> list[Config]:
    """Candidates best first for activations of `dtype`: 16-row tiles (tl.dot's minimum) for decode, wider ones
    for prefill. The weight-only modes dequantize to float32 and multiply in IEEE float32 for float32
    activations, on the FMA units with operands in registers: small tiles, or they spill."""
    if ieee_dots(dtype) and mode != "w8a8":
        shapes = [(16, 64, 32, 8, 2)] if m <= 16 else [(32, 64, 32, 4, 2)]
    else:
        shapes = ([(16, 64, 128, 8, 3), (16, 64, 64, 4, 2), (16, 64, 32, 4, 2)] if m <= 16 else
                  [(64, 128, 64, 8, 3), (64, 128, 32, 8, 2), (64, 64, 32, 4, 3)])
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps, stages,
                   _shared_bytes(bm, bn, bk, stages, mode, dtype, zero_point)) for bm, bn, bk, warps, stages in shapes]


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


def split_k_for(m: int, n: int, k: int, config: Config, sms: int = SMS) -> int:
    """K splits for a decode-sized M: enough programs for every SM, each keeping at least 4 K tiles."""
    blocks = config.blocks
    tiles = cdiv(m, blocks["BLOCK_M"]) * cdiv(n, blocks["BLOCK_N"])
    if m > 16 or tiles >= sms:
        return 1
    return max(1, min(cdiv(sms, tiles), k // (4 * blocks["BLOCK_K"]), 16))


def choose(m: int, n: int, k: int, mode: str, dtype: torch.dtype, zero_point: bool,
           target: Target) -> tuple[Config, int]:
    """The config and K splits an [m, k] x [k, n] launch runs with on `target` (H100's SM count where it has
    none, as in the interpreter): what `_matmul` launches and the cross-compile check compiles."""
    config = pick(configs(m, mode, dtype, zero_point), target.shared_limit)
    return config, split_k_for(m, n, k, config, target.sms or SMS)


def plan(a: Tensor, weight: Tensor, scales: Tensor, c: Tensor, mode: str, config: Config, split_k: int = 1,
         a_scale: Optional[Tensor] = None, qzeros: Optional[Tensor] = None, input_scale: Optional[Tensor] = None,
         bias: Optional[Tensor] = None, group_size: int = 128) -> Launch:
    """a [M, K] (int8 codes for w8a8, with a_scale [M]); c [M, N], fp32 and zeroed when split_k > 1."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    m, k = a.shape
    n = weight.shape[1] if mode == "int4" else weight.shape[0]
    flags = {"weight": mode, "zero_point": qzeros is not None, "input_scale": input_scale is not None,
             "bias": bias is not None, "split_k": split_k > 1, "ieee": ieee_dots(a.dtype)}
    args = [("a_ptr", a), ("w_ptr", weight), ("scale_ptr", scales), ("c_ptr", c)]
    args += [(name, t) for name, t in (("a_scale_ptr", a_scale), ("zeros_ptr", qzeros),
                                       ("in_scale_ptr", input_scale), ("bias_ptr", bias)) if t is not None]
    args += [("M", m), ("N", n), ("K", k), ("a_stride_m", a.stride(0)), ("c_stride_m", c.stride(0))]
    constexprs = {**config.blocks, "SPLIT_K": split_k, "GROUP_SIZE": group_size}
    grid = (cdiv(m, config.blocks["BLOCK_M"]) * cdiv(n, config.blocks["BLOCK_N"]), split_k)
    return Launch(TEMPLATE, flags, args, constexprs, grid, config.num_warps, config.num_stages)


def plan_quantize_rows(x: Tensor, q: Tensor, scale: Tensor, input_scale: Optional[Tensor] = None) -> Launch:
    """x [M, K] -> int8 codes q [M, K] and per-row scale [M]."""
    m, k = x.shape
    args = [("x_ptr", x)] + ([("in_scale_ptr", input_scale)] if input_scale is not None else [])
    args += [("q_ptr", q), ("s_ptr", scale), ("K", k), ("x_stride_m", x.stride(0))]
    flags = {"weight": "w8a8", "zero_point": False, "input_scale": input_scale is not None, "bias": False,
             "split_k": False, "ieee": False}
    return Launch(TEMPLATE, flags, args, {"BLOCK": next_pow2(k)}, (m,), num_warps=4, num_stages=1,
                  name="quantize_rows")


def _matmul(x: Tensor, weight: Tensor, scales: Tensor, mode: str, n: int, **extra: object) -> Tensor:
    """Plan and run one quantized matmul over x [..., K] (rows flattened); returns [..., N] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    zero_point = extra.get("qzeros") is not None
    config, split = choose(m, n, x2.shape[1], mode, x.dtype, zero_point, device_target(x.device))
    a, a_scale = x2, None
    if mode == "w8a8":
        a = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        a_scale = torch.empty(m, dtype=torch.float32, device=x.device)
        run(plan_quantize_rows(x2, a, a_scale, extra.pop("input_scale")))
    c = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1
         else torch.empty(m, n, dtype=x.dtype, device=x.device))
    run(plan(a, weight, scales, c, mode, config, split, a_scale, **extra))
    return c.to(x.dtype).reshape(*x.shape[:-1], n)


def linear_int8(x: Tensor, weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """kiln::linear_int8."""
    return _matmul(x, weight, scale, "int8", weight.shape[0], bias=bias)


def linear_w8a8(x: Tensor, weight: Tensor, scale: Tensor, input_scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """kiln::linear_w8a8."""
    return _matmul(x, weight, scale, "w8a8", weight.shape[0], input_scale=input_scale, bias=bias)


def linear_int4(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Optional[Tensor], input_scale: Optional[Tensor],
                bias: Optional[Tensor], group_size: int) -> Tensor:
    """kiln::linear_int4."""
    return _matmul(x, qweight, scales, "int4", qweight.shape[1], qzeros=qzeros, input_scale=input_scale,
                   bias=bias, group_size=group_size)


LOWERINGS = {"kiln.linear_int8": linear_int8, "kiln.linear_w8a8": linear_w8a8, "kiln.linear_int4": linear_int4}

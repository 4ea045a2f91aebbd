"""Descriptor of quant_matmul.py.jinja: dequantizing matmuls over int8 / int4 (GPTQ layout) weights and the
scaled int8 x int8 matmul of W8A8 with its per-token activation quantizer; plus launchers with the exact
contracts of kiln::linear_int8 / linear_w8a8 / linear_int4 (compiler/quant_ops.py), which backend "triton"
calls instead of the ops. Decode (small M) splits K so that a few output tiles still fill the GPU."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kiln.codegen.launch import Config, Launch, cdiv, next_pow2, run

TEMPLATE = "quant_matmul"
MODES = ("int8", "int4", "w8a8")
SMS = 132  # H100 SXM: the number of programs a split-K grid aims for


def configs(m: int) -> list[Config]:
    """Candidates best first: 16-row tiles (tl.dot's minimum) for decode, wider ones for prefill."""
    shapes = ([(16, 64, 128, 4, 3), (16, 64, 64, 4, 2)] if m <= 16 else
              [(64, 128, 64, 4, 3), (64, 64, 64, 4, 2)])
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, warps, stages) for bm, bn, bk, warps, stages in shapes]


def split_k_for(m: int, n: int, k: int, config: Config) -> int:
    """K splits for a decode-sized M: enough programs for every SM, each keeping at least 4 K tiles."""
    blocks = config.blocks
    tiles = cdiv(m, blocks["BLOCK_M"]) * cdiv(n, blocks["BLOCK_N"])
    if m > 16 or tiles >= SMS:
        return 1
    return max(1, min(cdiv(SMS, tiles), k // (4 * blocks["BLOCK_K"]), 16))


def plan(a: Tensor, weight: Tensor, scales: Tensor, c: Tensor, mode: str, config: Config, split_k: int = 1,
         a_scale: Optional[Tensor] = None, qzeros: Optional[Tensor] = None, input_scale: Optional[Tensor] = None,
         bias: Optional[Tensor] = None, group_size: int = 128) -> Launch:
    """a [M, K] (int8 codes for w8a8, with a_scale [M]); c [M, N], fp32 and zeroed when split_k > 1."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    m, k = a.shape
    n = weight.shape[1] if mode == "int4" else weight.shape[0]
    flags = {"weight": mode, "zero_point": qzeros is not None, "input_scale": input_scale is not None,
             "bias": bias is not None, "split_k": split_k > 1}
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
             "split_k": False}
    return Launch(TEMPLATE, flags, args, {"BLOCK": next_pow2(k)}, (m,), num_warps=4, num_stages=1,
                  name="quantize_rows")


def _matmul(x: Tensor, weight: Tensor, scales: Tensor, mode: str, n: int, **extra: object) -> Tensor:
    """Plan and run one quantized matmul over x [..., K] (rows flattened); returns [..., N] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    config = configs(m)[0]
    split = split_k_for(m, n, x2.shape[1], config)
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


def model_launches(hidden: int, intermediate: int, group_size: int = 128) -> dict[str, list[Launch]]:
    """The quantized matmuls of a decode step (M = 1, split-K) and a prefill (M = 2048) at a model's sizes, on
    meta tensors: what the cross-compile test compiles for sm_90."""
    meta = lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    out: dict[str, list[Launch]] = {}
    n, k = hidden, intermediate  # the down projection: few output tiles at decode, so K is split
    for label, m in (("decode", 1), ("prefill", 2048)):
        x, c = meta(m, k, dtype=torch.bfloat16), meta(m, n, dtype=torch.float32 if m == 1 else torch.bfloat16)
        q8, s8 = meta(n, k, dtype=torch.int8), meta(n, dtype=torch.float32)
        q4, s4 = meta(k // 8, n, dtype=torch.int32), meta(k // group_size, n, dtype=torch.float32)
        z4, xs = meta(k // group_size, n // 8, dtype=torch.int32), meta(k, dtype=torch.float32)
        for mode, weight, scales, extra in (("int8", q8, s8, {}), ("int4", q4, s4, {"input_scale": xs}),
                                            ("int4_zp", q4, s4, {"qzeros": z4}),
                                            ("w8a8", q8, s8, {"a_scale": meta(m, dtype=torch.float32)})):
            a = meta(m, k, dtype=torch.int8) if mode == "w8a8" else x
            out[f"quant_{mode}_{label}"] = [
                plan(a, weight, scales, c, mode.split("_")[0], cfg, split_k_for(m, n, k, cfg), group_size=group_size,
                     **extra) for cfg in configs(m)]
    out["quantize_rows"] = [plan_quantize_rows(meta(2048, k, dtype=torch.bfloat16), meta(2048, k, dtype=torch.int8),
                                               meta(2048, dtype=torch.float32))]
    return out


def cross_compile(out_dir: str, capability: int = 90, hidden: int = 2048, intermediate: int = 8192) -> list[dict]:
    """Compile every launch of model_launches for an NVIDIA target with no GPU (first fitting config each);
    run it in a process that has not imported Triton under TRITON_INTERPRET. Returns the records as dicts."""
    from dataclasses import asdict
    from pathlib import Path

    from kiln.codegen import cross_compile as xc

    root = Path(out_dir) / f"sm_{capability}"
    root.mkdir(parents=True, exist_ok=True)
    limit = xc.SHARED_LIMITS.get(capability, 99 * 1024)
    with xc.gpu_compilation():
        return [asdict(xc.first_fit(name, candidates, capability, limit, root, f"cuda:{capability}"))
                for name, candidates in model_launches(hidden, intermediate).items()]

"""Launchers with the exact contracts of the `kiln::` ops; backend "triton" calls these instead of the ops.

Each one allocates its outputs, plans its kernels with the plans in kernels/, and launches them; `@lowers`
declares which op it implements (`LOWERINGS`, read by the Triton lowering). They run on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1. Names are kept short because they appear as calls in the generated forward
(`kiln_codegen_launchers_rms_norm(...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from kiln.ops.metadata import current_max_query_len

from .kernel_plan import device_target, run
from .kernels import cache_write_plan, gated_act_plan, rms_norm_plan, rope_plan
from .kernels import paged_attention_plan as attn
from .kernels import quant_matmul_plan as quant

F = TypeVar("F", bound=Callable[..., object])
# kiln op name ("kiln.rms_norm") -> its launcher; ops without one keep their torch reference (layer_norm, ...).
LOWERINGS: dict[str, Callable[..., object]] = {}


def lowers(*ops: str) -> Callable[[F], F]:
    """Declare the decorated launcher as backend "triton"'s implementation of the kiln ops named."""

    def register(fn: F) -> F:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"{op} has two launchers: {LOWERINGS[op].__name__} and {fn.__name__}")
            LOWERINGS[op] = fn
        return fn

    return register


def _rows(x: Tensor) -> Tensor:
    """x as [rows, cols] with unit column stride, a view when possible."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@lowers("kiln.rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> Tensor:
    """kiln::rms_norm."""
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    run(rms_norm_plan.plan(x2, weight, out.view(-1, x.shape[-1]), eps, weight_offset))
    return out


@lowers("kiln.add_rms_norm")
def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float
) -> tuple[Tensor, Tensor]:
    """kiln::add_rms_norm: (rms_norm(x + residual), x + residual)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cols = x.shape[-1]
    run(
        rms_norm_plan.plan(
            _rows(x), weight, out.view(-1, cols), eps, weight_offset, _rows(residual), res_out.view(-1, cols)
        )
    )
    return out, res_out


def _gated(gate_up: Tensor, act: str) -> Tensor:
    cols = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], cols, dtype=gate_up.dtype, device=gate_up.device)
    run(gated_act_plan.plan(_rows(gate_up), out.view(-1, cols), act))
    return out


@lowers("kiln.silu_mul")
def silu_mul(gate_up: Tensor) -> Tensor:
    """kiln::silu_mul."""
    return _gated(gate_up, "silu")


@lowers("kiln.gelu_mul")
def gelu_mul(gate_up: Tensor, approximate: str) -> Tensor:
    """kiln::gelu_mul."""
    return _gated(gate_up, "gelu_tanh" if approximate == "tanh" else "gelu")


@lowers("kiln.rope")
def rope(
    q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool
) -> tuple[Tensor, Tensor]:
    """kiln::rope: new rotated (q, k); the kernel itself can also rotate in place."""
    q, k = _unit_last(q), _unit_last(k)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    run(rope_plan.plan(q, k, q_out, k_out, positions, cos_sin_cache, rotary_dim, neox_style))
    return q_out, k_out


@lowers("kiln.paged_attention")
def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    window: int,
    softcap: float,
    num_splits: int | None = None,
) -> Tensor:
    """kiln::paged_attention: write the step's K/V into the cache, then attend. `num_splits` overrides the
    split-KV choice (tests exercise the merge under the interpreter with it)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    run(cache_write_plan.plan(k, v, k_cache, v_cache, slot_mapping))
    tokens, heads, _ = q.shape
    num_seqs = seq_lens.shape[0]
    # A decode step (one token per sequence) needs no host sync: that keeps it capturable in a CUDA graph.
    # The runner passes the longest query as a host integer; reading it back from the device (a sync) is the
    # fallback for callers that build metadata by hand. A decode step is 1 either way (CUDA graphs rely on it).
    max_q = (
        1 if tokens == num_seqs else current_max_query_len() or int((query_start_loc[1:] - query_start_loc[:-1]).max())
    )
    kv_heads, v_dim = k_cache.shape[2], v_cache.shape[-1]
    target = device_target(q.device)
    config, splits = attn.choose(num_seqs, max_q, heads, kv_heads, q.shape[-1], v_dim, q.dtype, target)
    splits = num_splits or splits
    out = torch.empty(tokens, heads, v_dim, dtype=q.dtype, device=q.device)
    partial = lse = None
    if splits > 1:
        partial = torch.empty(tokens, heads, splits, v_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    for launch in attn.plan(
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        window,
        softcap,
        max_q,
        config,
        splits,
        partial,
        lse,
    ):
        run(launch)
    return out


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
    x2 = _rows(x)
    m = x2.shape[0]
    config, split = quant.choose(m, n, x2.shape[1], mode, x.dtype, qzeros is not None, device_target(x.device))
    a, a_scale = x2, None
    if mode == "w8a8":  # the activations' own int8 codes; input_scale is applied while quantizing them
        a = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
        a_scale = torch.empty(m, dtype=torch.float32, device=x.device)
        run(quant.plan_quantize_rows(x2, a, a_scale, input_scale))
        input_scale = None
    c = (
        torch.zeros(m, n, dtype=torch.float32, device=x.device)
        if split > 1
        else torch.empty(m, n, dtype=x.dtype, device=x.device)
    )
    run(quant.plan(a, weight, scales, c, mode, config, split, a_scale, qzeros, input_scale, bias, group_size))
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

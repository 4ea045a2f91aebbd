"""Fused `kiln::` ops that the fusion passes (passes/fuse_*.py) rewrite HF patterns into.

Each op is a `torch.library.custom_op` with a vectorised pure-torch reference (the specification; backend
"reference" runs it, or on CPU the C kernel backends/cpu/lowering.py chooses for it) and a fake. Tensors are
token-major: activations [T, hidden], attention heads [T, heads, head_dim]. The references are numerically
neutral with HF: norms are computed in float32 and cast back the way HF's modules do, so a fused graph matches
the unfused one to float noise; Triton kernels (codegen/) implement the same contracts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> Tensor:
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset == 0.0:  # Llama: weight * normed.to(dtype)
        return weight * normed.to(x.dtype)
    return (normed * (weight.float() + weight_offset)).to(x.dtype)  # Gemma: normed * (1 + w) in float32


def rms_norm(x: Tensor, weight: Tensor, eps: float, weight_offset: float) -> Tensor:
    """RMSNorm over the last dim, statistics in float32.

    weight_offset 0.0: Llama form, `weight * normed.to(x.dtype)`; weight_offset 1.0: Gemma form,
    `(normed * (1 + weight.float())).to(x.dtype)`. x [..., hidden], weight [hidden]; returns x's shape and dtype.
    """
    return _rms(x, weight, eps, weight_offset)


rms_norm_op = torch.library.custom_op("kiln::rms_norm", rms_norm, mutates_args=())


@rms_norm_op.register_fake
def _(x, weight, eps, weight_offset):
    return torch.empty_like(x)


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float
) -> tuple[Tensor, Tensor]:
    """The residual add before a norm: residual_out = x + residual (in x's dtype), out = rms_norm(residual_out).

    Returns (out, residual_out); residual_out is the next layer's residual stream.
    """
    residual_out = x + residual
    return _rms(residual_out, weight, eps, weight_offset), residual_out


add_rms_norm_op = torch.library.custom_op("kiln::add_rms_norm", add_rms_norm, mutates_args=())


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps, weight_offset):
    return torch.empty_like(x), torch.empty_like(x)


def _ln(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim with optional affine weight/bias (None for OLMo's non-parametric norm).

    Computed as `aten.layer_norm` in x's dtype, as nn.LayerNorm does (it accumulates in float32 internally).
    """
    return _ln(x, weight, bias, eps)


layer_norm_op = torch.library.custom_op("kiln::layer_norm", layer_norm, mutates_args=())


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """residual_out = x + residual, out = layer_norm(residual_out); returns (out, residual_out)."""
    residual_out = x + residual
    return _ln(residual_out, weight, bias, eps), residual_out


add_layer_norm_op = torch.library.custom_op("kiln::add_layer_norm", add_layer_norm, mutates_args=())


@add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _halves(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    half = gate_up.shape[-1] // 2
    return gate_up[..., :half], gate_up[..., half:]


def silu_mul(gate_up: Tensor) -> Tensor:
    """Gated SiLU MLP activation on the fused gate/up projection: gate_up [T, 2I] -> silu(gate) * up [T, I]."""
    gate, up = _halves(gate_up)
    return F.silu(gate) * up


silu_mul_op = torch.library.custom_op("kiln::silu_mul", silu_mul, mutates_args=())


@silu_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def gelu_mul(gate_up: Tensor, approximate: str) -> Tensor:
    """Gated GELU: gate_up [T, 2I] -> gelu(gate, approximate) * up [T, I]; approximate is "none" or "tanh"."""
    gate, up = _halves(gate_up)
    return F.gelu(gate, approximate=approximate) * up


gelu_mul_op = torch.library.custom_op("kiln::gelu_mul", gelu_mul, mutates_args=())


@gelu_mul_op.register_fake
def _(gate_up, approximate):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, neox_style: bool) -> Tensor:
    if neox_style:  # rotate-half, pairs (i, i + rotary_dim/2): x*cos + cat(-x2, x1)*sin written per half, same bits
        x1, x2 = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
        parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    else:  # GPT-J interleaved: pairs (2i, 2i + 1)
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        parts = [torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)]
    return torch.cat(parts + [x[..., rotary_dim:]] if rotary_dim < x.shape[-1] else parts, -1)


def rope(
    q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool
) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [T, Hq, D] and k [T, Hkv, D] at `positions` [T]; returns new (q_out, k_out).

    cos_sin_cache [max_pos, rotary_dim] holds cos (first rotary_dim/2 columns) then sin, precomputed at compile
    time in float32 from the model's inv_freq and attention scaling. As in HF, cos/sin are cast to q's dtype and
    the rotation runs in q's dtype. Only the first rotary_dim of D dims rotate (partial rotary); the rest pass
    through.
    """
    cs = cos_sin_cache[positions.long()].to(q.dtype)[:, None, :]  # [T, 1, rotary_dim]
    cos, sin = cs.chunk(2, dim=-1)
    return _rotate(q, cos, sin, rotary_dim, neox_style), _rotate(k, cos, sin, rotary_dim, neox_style)


rope_op = torch.library.custom_op("kiln::rope", rope, mutates_args=())


@rope_op.register_fake
def _(q, k, positions, cos_sin_cache, rotary_dim, neox_style):
    return torch.empty_like(q), torch.empty_like(k)

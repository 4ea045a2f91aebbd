"""Quantized `kiln::` ops: linears over int8 / int4 weights, and paged attention over an int8 / fp8 KV cache.

Weight layouts (what passes/quantize.py registers and the Triton templates in codegen/ read):
- int8 and w8a8: weight int8 [N, K] (nn.Linear's layout), per-output-channel fp32 scale [N], symmetric.
- int4 (GPTQ layout): qweight int32 [K/8, N], nibble k at shift (k % 8) * 4, stored unsigned (0..15);
  fp32 scales [K/group, N]; zero points int32 [K/group, N/8] packed along N, or none (symmetric: zero 8).
An optional fp32 `input_scale` [K] multiplies the activations first: the inverse of AWQ / SmoothQuant's
per-input-channel scales, which were multiplied into the weight before quantizing.

The references are the specification, in pure torch: w8a8 runs `torch._int_mm` on per-token int8 activations;
weight-only int8 and int4 dequantize and run a float GEMM (no torch CPU kernel that keeps activations exact beats
fp32 here: see README, "Quantization"). On CPU, backend "reference" stores int8 and w8a8 weights in tiles for
kiln's C kernels (`linear_int8_packed`, `linear_w8a8_packed` below, run by backends/cpu/lowering.py); int4 keeps
its reference.

Quantized KV caches hold each token-and-head vector as [D values | 4 bytes of fp32 scale] in one tensor of
the cache dtype ([num_blocks, block_size, kv_heads, D + 4]), so the runtime still passes two caches per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import attention

SCALE_BYTES = 4  # the fp32 scale stored after each quantized K/V vector
KV_CACHE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
_KV_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_int8(w: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale per slice along `dim` reduced away: ([..., K] int8, scale [...] fp32)."""
    scale = w.float().abs().amax(dim, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(dim)


def pack_int4(q: Tensor, dim: int) -> Tensor:
    """Unsigned nibbles (0..15) packed 8 to an int32 along `dim`, nibble i at shift 4 * i."""
    q = q.movedim(dim, 0).to(torch.int64)
    q = q.reshape(q.shape[0] // 8, 8, *q.shape[1:])
    shifts = (torch.arange(8, device=q.device) * 4).view(1, 8, *[1] * (q.dim() - 2))
    packed = (q << shifts).sum(1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement wrap
    return packed.movedim(0, dim)


def unpack_int4(packed: Tensor, dim: int) -> Tensor:
    """The inverse of pack_int4: int32 nibble words -> int32 values 0..15, 8x longer along `dim`."""
    p = packed.movedim(dim, 0)
    shifts = (torch.arange(8, device=p.device, dtype=torch.int32) * 4).view(1, 8, *[1] * (p.dim() - 1))
    q = (p.unsqueeze(1) >> shifts) & 0xF
    return q.reshape(p.shape[0] * 8, *p.shape[1:]).movedim(0, dim)


def quantize_int4(w: Tensor, group_size: int, zero_point: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Group-wise round-to-nearest int4 of w [N, K] -> (qweight [K/8, N], scales [K/g, N], qzeros or None)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    if zero_point:  # asymmetric over [min, max] (0 kept representable)
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
    else:
        scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7.0
        zero = torch.full_like(scale, 8.0)
    q = (torch.round(g / scale) + zero).clamp(0, 15).reshape(n, k)
    scales = scale.squeeze(-1).t().contiguous()
    qzeros = pack_int4(zero.squeeze(-1).t(), dim=1).contiguous() if zero_point else None
    return pack_int4(q.t(), dim=0).contiguous(), scales, qzeros


def dequantize_int4(qweight: Tensor, scales: Tensor, qzeros: Tensor | None, group_size: int) -> Tensor:
    """fp32 W^T [K, N] from the GPTQ layout (scales and zeros broadcast per group, never expanded)."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = unpack_int4(qweight, dim=0).view(k // group_size, group_size, n).float()
    if qzeros is not None:
        q -= unpack_int4(qzeros, dim=1).float()[:, None, :]
    else:
        q -= 8.0
    return q.mul_(scales[:, None, :]).view(k, n)


def quantize_tokens(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token dynamic int8 of x [M, K]: each row's scale depends on that row only, never on the batch."""
    return quantize_int8(x, dim=-1)


def _rows(x: Tensor, input_scale: Tensor | None) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 * input_scale if input_scale is not None else x2


def _finish(y: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_mm(a: Tensor, b_t: Tensor) -> Tensor:
    """int8 [M, K] @ int8 [K, N] (column-major) -> int32; `_int_mm` where torch has it for these sizes."""
    if a.device.type == "cpu" or a.shape[0] > 16:
        return torch._int_mm(a, b_t)
    return (a.double() @ b_t.double()).to(torch.int32)  # exact: sums of int8 products fit in float64


def linear_int8(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Weight-only int8: y = (x @ weightᵀ) * scale + bias, activations exact, fp32 accumulation (the weight is
    dequantized for torch's GEMM)."""
    y = torch.nn.functional.linear(_rows(x, None).float(), weight.float()) * scale
    return _finish(y, x, bias)


linear_int8_op = torch.library.custom_op("kiln::linear_int8", linear_int8, mutates_args=())

INT8_TILE = 16  # output channels per tile of the CPU layout (backends/cpu/quant.c, linear_i8_packed)


def packs_int8(weight: Tensor) -> bool:
    """Whether an int8 [N, K] weight fits the CPU tile layout of weight-only int8."""
    return weight.dim() == 2 and weight.shape[0] % INT8_TILE == 0


def pack_int8(weight: Tensor) -> Tensor:
    """int8 [N, K] -> [N/16, K, 16]: each tile of 16 output channels read front to back by the CPU kernel."""
    n, k = weight.shape
    return weight.reshape(n // INT8_TILE, INT8_TILE, k).transpose(1, 2).contiguous()


def unpack_int8(packed: Tensor) -> Tensor:
    """The inverse of pack_int8."""
    nb, k, tile = packed.shape
    return packed.transpose(1, 2).reshape(nb * tile, k)


def linear_int8_packed(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """kiln::linear_int8 with its weight in the CPU tile layout (backend "reference" repacks it when it lowers
    the graph): the reference over the unpacked weight."""
    return linear_int8(x, unpack_int8(packed), scale, bias)


linear_int8_packed_op = torch.library.custom_op("kiln::linear_int8_packed", linear_int8_packed, mutates_args=())


def linear_w8a8(x: Tensor, weight: Tensor, scale: Tensor, input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """W8A8: x (times input_scale) quantized per token to int8, int8 x int8 -> int32, then token x channel scales."""
    xq, x_scale = quantize_tokens(_rows(x, input_scale))
    y = int8_mm(xq, weight.t()).float() * x_scale[:, None] * scale
    return _finish(y, x, bias)


linear_w8a8_op = torch.library.custom_op("kiln::linear_w8a8", linear_w8a8, mutates_args=())

W8A8_TILE = (4, 64)  # weight rows x columns of one tile of the CPU layout (backends/cpu/quant.c)


def packs_w8a8(weight: Tensor) -> bool:
    """Whether an int8 [N, K] weight fits the CPU tile layout."""
    return weight.dim() == 2 and weight.shape[0] % W8A8_TILE[0] == 0 and weight.shape[1] % W8A8_TILE[1] == 0


def pack_w8a8(weight: Tensor) -> Tensor:
    """int8 [N, K] -> [N/4, K/64, 4, 64]: each 4-row block read front to back by the CPU kernel."""
    (n, k), (tr, tc) = weight.shape, W8A8_TILE
    return weight.reshape(n // tr, tr, k // tc, tc).transpose(1, 2).contiguous()


def unpack_w8a8(packed: Tensor) -> Tensor:
    """The inverse of pack_w8a8."""
    nb, kb, tr, tc = packed.shape
    return packed.transpose(1, 2).reshape(nb * tr, kb * tc)


def linear_w8a8_packed(
    x: Tensor, packed: Tensor, scale: Tensor, input_scale: Tensor | None, bias: Tensor | None
) -> Tensor:
    """kiln::linear_w8a8 with its weight in the CPU tile layout (backend "reference" repacks it when it lowers
    the graph): the reference over the unpacked weight."""
    return linear_w8a8(x, unpack_w8a8(packed), scale, input_scale, bias)


linear_w8a8_packed_op = torch.library.custom_op("kiln::linear_w8a8_packed", linear_w8a8_packed, mutates_args=())


def linear_int4(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor | None,
    input_scale: Tensor | None,
    bias: Tensor | None,
    group_size: int,
) -> Tensor:
    """Weight-only group-wise int4 (GPTQ layout): y = (x * input_scale) @ dequant(W) + bias, fp32 accumulation."""
    y = _rows(x, input_scale).float() @ dequantize_int4(qweight, scales, qzeros, group_size)
    return _finish(y, x, bias)


linear_int4_op = torch.library.custom_op("kiln::linear_int4", linear_int4, mutates_args=())


@linear_int8_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@linear_w8a8_op.register_fake
def _(x, weight, scale, input_scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@linear_int8_packed_op.register_fake
def _(x, packed, scale, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0] * packed.shape[2])


@linear_w8a8_packed_op.register_fake
def _(x, packed, scale, input_scale, bias):
    return x.new_empty(*x.shape[:-1], packed.shape[0] * packed.shape[2])


@linear_int4_op.register_fake
def _(x, qweight, scales, qzeros, input_scale, bias, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


# KV cache -----------------------------------------------------------------------------------------------


def quantize_kv(x: Tensor, cache_dtype: torch.dtype) -> Tensor:
    """x [T, H, D] -> [T, H, D + 4] of cache_dtype: values scaled by the vector's amax, then its fp32 scale."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / _KV_MAX[cache_dtype]
    scaled = x.float() / scale
    values = torch.round(scaled).clamp(-127, 127) if cache_dtype == torch.int8 else scaled
    out = torch.empty(*x.shape[:-1], x.shape[-1] + SCALE_BYTES, dtype=cache_dtype, device=x.device)
    out[..., : x.shape[-1]] = values.to(cache_dtype)
    out[..., x.shape[-1] :].view(torch.float32).copy_(scale)
    return out


def dequantize_kv(packed: Tensor) -> Tensor:
    """[..., D + 4] quantized vectors -> fp32 [..., D]."""
    dim = packed.shape[-1] - SCALE_BYTES
    return packed[..., :dim].float() * packed[..., dim:].view(torch.float32)


def attend_quantized(
    attend: Callable[..., Tensor],
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
) -> Tensor:
    """Paged attention over a quantized cache through `attend`, a float kiln::paged_attention implementation.

    The step's K/V are quantized into the cache; the blocks the batch reads are dequantized into a compact
    fp32 cache, and `attend` (the reference, or on CPU the C decode path) attends over that."""
    for cache, new in ((k_cache, k), (v_cache, v)):  # copied as bytes: index_copy_ has no fp8 kernel on CPU
        rows = cache.view(torch.uint8).view(-1, *cache.shape[2:])
        rows.index_copy_(0, slot_mapping, quantize_kv(new, cache.dtype).view(torch.uint8))
    block_size = k_cache.shape[1]
    max_blocks = max(1, (int(seq_lens.max()) + block_size - 1) // block_size)
    used, tables = torch.unique(block_tables[:, :max_blocks].long(), return_inverse=True)
    k_f, v_f = dequantize_kv(k_cache[used]), dequantize_kv(v_cache[used])
    none = slot_mapping[:0]  # the step's K/V are in the compact cache already: the float op writes nothing
    out = attend(
        q.float(),
        k[:0].float(),
        v[:0].float(),
        k_f,
        v_f,
        none,
        tables.to(torch.int32),
        seq_lens,
        query_start_loc,
        scale,
        window,
        softcap,
    )
    return out.to(q.dtype)


def paged_attention_quant(
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
) -> Tensor:
    """kiln::paged_attention over a quantized cache (int8 or fp8 e4m3, [.., D + 4] with inline scales)."""
    return attend_quantized(
        attention.paged_attention,
        q,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        window,
        softcap,
    )


paged_attention_quant_op = torch.library.custom_op(
    "kiln::paged_attention_quant", paged_attention_quant, mutates_args=("k_cache", "v_cache")
)


@paged_attention_quant_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale, window, softcap):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1] - SCALE_BYTES)

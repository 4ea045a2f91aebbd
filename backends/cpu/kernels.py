"""Compiled C kernels for kiln's ops on CPU (float32), chosen per call by `lowering.py` when they apply.

Decode reads each sequence's whole context every step; the torch formulation has to gather it into a padded
tensor first, which costs more than the attention itself, so the C loop reads the cache blocks in place. The
fused ops (RMSNorm with its residual add, gated SiLU, rotary embedding, the cache write) are each one pass over
memory in C where torch needs several ops and temporaries: that is what makes fusion pay on the reference
backend. `kernels.c` (with `quant.c`) is built once per instruction-set level with the system C compiler, as a
CPython extension module, into kiln's cache directory; `build.py` picks the level from the CPU's features
(`KILN_CPU_ISA` forces a lower one) and checks each library's hash before it loads it. When no
compiler or Python headers are found (or KILN_DISABLE_CPU_KERNELS=1), or a call is outside a kernel (not
float32 on CPU, not contiguous in its last dim), the torch reference runs instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from types import ModuleType

import torch
from torch import Tensor

from . import build

_PLAIN = (torch.Tensor, torch.nn.Parameter)


_scoped: list[ModuleType] = []  # libraries that `at_level` blocks put in force, innermost last


def _library() -> ModuleType | None:
    """The compiled extension module: the one an `at_level` block chose, else this process's level (build.py),
    built on first use; None when it cannot be had or KILN_DISABLE_CPU_KERNELS=1. A bad KILN_CPU_ISA is a
    ValueError."""
    return _scoped[-1] if _scoped else _process_library()


@lru_cache(maxsize=1)
def _process_library() -> ModuleType | None:
    if os.environ.get("KILN_DISABLE_CPU_KERNELS") == "1":
        return None
    return build.load(build.selected_level())


@contextmanager
def at_level(level: str) -> Iterator[None]:
    """Run the kernels at `level` (one `build.supported_levels()` lists) inside the block, so a benchmark can
    alternate levels in one process and one load; ValueError for a level this CPU lacks."""
    if level not in build.supported_levels():
        raise ValueError(f"level={level!r}: this CPU runs {build.supported_levels()}")
    library = build.load(level)
    if library is None:
        raise RuntimeError(f"kiln's CPU kernels could not be built for {level}")
    _scoped.append(library)
    try:
        yield
    finally:
        _scoped.pop()


def isa() -> str | None:
    """The level the kernels run at ("avx512_vnni", "avx2", "scalar"; "native" off x86), None without them."""
    library = _library()
    return None if library is None else str(library.isa)


def _built() -> ModuleType:
    """The extension module, for a call that `applies` admitted (so it was built)."""
    library = _library()
    if library is None:
        raise RuntimeError("kiln's CPU kernels are not built; check applies() before calling one")
    return library


def applies(*tensors: Tensor | None) -> bool:
    """Whether the C kernels cover these tensors: plain float32 CPU tensors (not fake or functional ones, as
    under torch.export), last dim contiguous; and the library could be built."""
    for t in tensors:
        if t is not None and not (type(t) in _PLAIN and t.dtype is torch.float32 and t.is_cpu and t.stride(-1) == 1):
            return False
    return _library() is not None


def _rows(x: Tensor) -> tuple[Tensor, int, int]:
    """(x, rows, row stride) for x read as [rows, last dim]: strided splits such as a slice of the fused qkv
    projection are read in place; only layouts that are not one row stride are copied."""
    if x.dim() == 2 or (x.dim() == 3 and x.shape[0] == 1):
        return x, x.shape[-2], x.stride(-2)
    x = x.reshape(-1, x.shape[-1]).contiguous()
    return x, x.shape[0], x.shape[1]


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t as a contiguous `dtype` tensor; the metadata usually is one already, and `.to().contiguous()` would still
    cost two dispatcher calls per layer."""
    return t if t.dtype is dtype and t.is_contiguous() else t.to(dtype).contiguous()


SMALL_LINEAR_ROWS = 16  # int8 weights: up to here the C loops beat dequantize + GEMM
C_LINEAR_ROWS = 4  # float32: above this oneDNN over its own weight layout is faster than the C loop
# oneDNN builds and keeps a primitive per input shape, so every new row count (each batch's token count) grew
# memory for good. Decode batches (up to ONEDNN_EXACT_ROWS rows, one per sequence) keep their exact shape, since
# padding them would cost up to 2x their GEMM time; larger row counts (prefill chunks) are padded up to a
# multiple of ONEDNN_ROW_BUCKET, < 64 wasted rows among hundreds. At most ~300 shapes in all.
ONEDNN_EXACT_ROWS = 256
ONEDNN_ROW_BUCKET = 64


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`aten.linear` for backend "reference": the C loop for the few rows of small-batch decode, oneDNN over a
    weight reordered once into its blocked layout for the rest (MKL's sgemm, behind torch's `linear`, runs at
    half its speed at decode sizes here), torch where neither applies."""
    rows = x.numel() // x.shape[-1]
    if rows <= C_LINEAR_ROWS and weight.is_contiguous() and applies(x, weight, bias):
        return small_linear(x, weight, None, bias)
    blocked = _onednn_weight(weight)
    if (
        blocked is not None
        and type(x) in _PLAIN
        and x.dtype is torch.float32
        and (bias is None or bias.dtype is x.dtype)
    ):
        x2 = x.reshape(rows, x.shape[-1])
        padded = rows if rows <= ONEDNN_EXACT_ROWS else -(-rows // ONEDNN_ROW_BUCKET) * ONEDNN_ROW_BUCKET
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, padded - rows)) if padded != rows else x2.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(x2, blocked, bias, "none", [], "")
        return out[:rows].reshape(*x.shape[:-1], weight.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


def _onednn_weight(weight: Tensor) -> Tensor | None:
    """weight in oneDNN's blocked layout, made on first use and kept on the tensor; None where oneDNN does not
    apply (no mkldnn build, not a plain float32 CPU matrix, KILN_ONEDNN=0). The blocked copy doubles the
    memory of float32 linear weights: the plain one stays, for the C loop and for saving artifacts."""
    version, blocked = getattr(weight, "_kiln_onednn", (None, None))
    if version != weight._version:  # never made, or the weight was written in place since
        blocked = None
        if (
            _onednn_enabled()
            and type(weight) in _PLAIN
            and weight.dtype is torch.float32
            and weight.is_cpu
            and weight.dim() == 2
        ):
            blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
        setattr(weight, "_kiln_onednn", (weight._version, blocked))  # noqa: B010 - not a declared Tensor field
    return blocked


@lru_cache(maxsize=1)
def _onednn_enabled() -> bool:
    return torch.backends.mkldnn.is_available() and os.environ.get("KILN_ONEDNN", "1") != "0"


def small_linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """(x @ weight.T) * scale + bias through the C loop: weight [N, K] contiguous, float32 or int8 (with a float32
    scale per output channel); x float32 with at most SMALL_LINEAR_ROWS rows. The caller checks both."""
    x2, rows, stride = _rows(x)
    shape = list(x.shape)
    shape[-1] = weight.shape[0]
    out = torch.empty(shape, dtype=x.dtype)
    _built().small_linear(
        x2.data_ptr(),
        weight.data_ptr(),
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        weight.shape[0],
        weight.shape[1],
        stride,
        torch.get_num_threads(),
        int(weight.dtype is torch.int8),
    )
    return out


def linear_w8a8_packed(
    x: Tensor, packed: Tensor, scale: Tensor, input_scale: Tensor | None, bias: Tensor | None
) -> Tensor:
    """kiln::linear_w8a8_packed through the C loop (VNNI, AVX2 or portable: see build.py), bit for bit: x float32
    [..., K], packed int8 weight tiles [N/4, K/64, 4, 64] contiguous, float32 scale [N]. The caller checks all
    three."""
    x2, rows, stride = _rows(x)
    n, k = packed.shape[0] * packed.shape[2], packed.shape[1] * packed.shape[3]
    shape = list(x.shape)
    shape[-1] = n
    out = torch.empty(shape, dtype=x.dtype)
    _built().linear_w8a8_packed(
        x2.data_ptr(),
        None if input_scale is None else input_scale.data_ptr(),
        packed.data_ptr(),
        scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        n,
        k,
        stride,
        torch.get_num_threads(),
    )
    return out


def linear_int8_packed(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """kiln::linear_int8_packed through the C loop: x float32 with at most SMALL_LINEAR_ROWS rows, int8 weight
    tiles [N/16, K, 16] contiguous, float32 scale [N]. The caller checks all three."""
    x2, rows, stride = _rows(x)
    n, k = packed.shape[0] * packed.shape[2], packed.shape[1]
    shape = list(x.shape)
    shape[-1] = n
    out = torch.empty(shape, dtype=x.dtype)
    _built().linear_i8_packed(
        x2.data_ptr(),
        packed.data_ptr(),
        scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        n,
        k,
        stride,
        torch.get_num_threads(),
    )
    return out


def paged_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    window: int,
    softcap: float,
) -> Tensor:
    """One query token per sequence: q [S, Hq, D] -> [S, Hq, Dv]. Caches must be contiguous."""
    q = q.contiguous()
    tables, lens = _dense(block_tables, torch.int32), _dense(seq_lens, torch.int32)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    v_dim = v_cache.shape[-1]
    out = torch.empty(num_seqs, num_heads, v_dim, dtype=q.dtype)
    _built().paged_decode(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        num_seqs,
        num_heads,
        kv_heads,
        head_dim,
        v_dim,
        block_size,
        tables.shape[1],
        scale,
        window,
        softcap,
        torch.get_num_threads(),
    )
    return out


def cache_write(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k/v [T, Hkv, D] into the contiguous caches at `slot_mapping` [T]; slot -1 (padding) is skipped."""
    k2, v2 = k.flatten(1), v.flatten(1)
    k2 = k2 if k2.stride(-1) == 1 else k2.contiguous()
    v2 = v2 if v2.stride(-1) == 1 else v2.contiguous()
    slots = _dense(slot_mapping, torch.int64)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if _built().cache_write(
        k2.data_ptr(),
        v2.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        slots.numel(),
        num_slots,
        k2.shape[1],
        v2.shape[1],
        k2.stride(0),
        v2.stride(0),
    ):
        raise IndexError(f"slot_mapping holds a slot outside the KV cache's {num_slots} slots")


def rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, weight_offset: float
) -> tuple[Tensor, Tensor | None]:
    """(norm(x + residual), x + residual) or (norm(x), None); weight contiguous [hidden]. Outputs are x's shape."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    x2, rows, x_stride = _rows(x)
    res_ptr = res_out_ptr = None
    res_stride, res_out = 0, None
    if residual is not None:
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        residual, _, res_stride = _rows(residual)
        res_ptr, res_out_ptr = residual.data_ptr(), res_out.data_ptr()
    _built().rms_norm(
        x2.data_ptr(),
        res_ptr,
        weight.contiguous().data_ptr(),
        out.data_ptr(),
        res_out_ptr,
        rows,
        x.shape[-1],
        x_stride,
        res_stride,
        eps,
        weight_offset,
        torch.get_num_threads(),
    )
    return out, res_out


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [..., 2I] -> silu(gate) * up [..., I]."""
    shape = list(gate_up.shape)
    inter = shape[-1] // 2
    shape[-1] = inter
    out = torch.empty(shape, dtype=gate_up.dtype)
    gate_up, rows, stride = _rows(gate_up)
    _built().silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, inter, stride, torch.get_num_threads())
    return out


def argmax_rows(x: Tensor) -> Tensor:
    """x [rows, cols] -> int64 [rows], torch.argmax(x, -1) (first index of the maximum; NaN is never one)."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _built().argmax_rows(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0), torch.get_num_threads())
    return out


def rope(x: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, neox_style: bool) -> Tensor:
    """x [T, H, D] (heads contiguous within a token) rotated at `positions` [T] into a new contiguous tensor."""
    if x.stride(1) != x.shape[2]:
        x = x.contiguous()
    pos = _dense(positions, torch.int64)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if _built().rope(
        x.data_ptr(),
        out.data_ptr(),
        pos.data_ptr(),
        cos_sin_cache.contiguous().data_ptr(),
        x.shape[0],
        x.shape[1],
        x.shape[2],
        x.stride(0),
        rotary_dim,
        int(neox_style),
        cos_sin_cache.shape[0],
        torch.get_num_threads(),
    ):
        raise IndexError(f"a position is outside the rotary cache's {cos_sin_cache.shape[0]} positions")
    return out

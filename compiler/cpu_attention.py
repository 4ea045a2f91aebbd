"""A compiled C kernel for paged decode attention on CPU, used by the reference op when it applies.

Decode reads each sequence's whole context every step; the torch formulation has to gather it into a
padded tensor first, which costs more than the attention itself. The C loop reads the cache blocks in place.
It is built once with the system C compiler into kiln's cache directory; when no compiler is found, or the
case is outside it (not float32, or caches that are not contiguous), the torch path runs instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_attention.c")


def _cache_dir() -> Path:
    root = os.environ.get("KILN_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "kiln") / "cpu"


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KILN_DISABLE_CPU_KERNELS") == "1":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"paged_decode-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True)
            if result.returncode != 0:
                return None
            os.replace(built, target)  # atomic: concurrent builders never see half a library
    lib = ctypes.CDLL(str(target))
    lib.paged_decode_f32.restype = None
    lib.paged_decode_f32.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [
        ctypes.c_float, ctypes.c_int64, ctypes.c_float]
    return lib


def decode_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the C kernel covers this call (and could be built)."""
    kv_heads = k_cache.shape[2]
    return (
        q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and _library() is not None
    )


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, window: int, softcap: float,
) -> torch.Tensor:
    """One query token per sequence: q [S, Hq, D] -> [S, Hq, Dv]."""
    q = q.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    v_dim = v_cache.shape[-1]
    out = torch.empty(num_seqs, num_heads, v_dim, dtype=q.dtype)
    _library().paged_decode_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        num_seqs, num_heads, kv_heads, head_dim, v_dim, block_size, tables.shape[1], scale, window, softcap,
    )
    return out

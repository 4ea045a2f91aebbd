"""How many KV blocks the engine gets: an explicit count, a byte budget, or on a GPU what is left of
`gpu_memory_utilization` (vLLM's name and meaning) after the weights and one profiled forward at the largest step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.ops.metadata import AttentionMetadata

DEFAULT_CPU_KV_BYTES = 1 << 30
GIB = float(1 << 30)


@dataclass(frozen=True)
class KVPool:
    """The pool's size and where it came from, for stats, /metrics and the start-up log."""

    num_blocks: int
    block_size: int
    bytes_per_block: int
    source: str  # what sized it: num_kv_blocks, kv_cache_memory, gpu_memory_utilization or the CPU default

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self) -> str:
        size = f"{self.bytes / GIB:.2f} GiB" if self.bytes >= GIB else f"{self.bytes / (1 << 20):.1f} MiB"
        return (
            f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = {self.tokens} tokens, {size} "
            f"(sized by {self.source})"
        )


def size_kv_pool(
    model: Any,
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    num_kv_blocks: int | None,
    kv_cache_memory: int | None,
    gpu_memory_utilization: float,
) -> KVPool:
    """The pool for `model`: num_kv_blocks wins, then kv_cache_memory, then on a GPU the memory
    gpu_memory_utilization leaves, else (CPU) room for max_num_seqs full sequences within 1 GiB."""
    if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    per_block = model.kv_cache_bytes_per_block(block_size)

    def pool(num_blocks: int, source: str) -> KVPool:
        return KVPool(int(num_blocks), block_size, per_block, source)

    if num_kv_blocks is not None:
        if not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be a positive integer, got {num_kv_blocks!r}")
        return pool(num_kv_blocks, "num_kv_blocks")
    one_sequence = -(-max_model_len // block_size) * per_block
    if kv_cache_memory is not None:
        if kv_cache_memory < one_sequence:
            raise ValueError(
                f"kv_cache_memory ({kv_cache_memory} bytes) cannot hold one sequence of max_model_len "
                f"({max_model_len} tokens), which needs {one_sequence} bytes ({one_sequence / GIB:.3f} "
                f"GiB); raise kv_cache_memory or lower max_model_len"
            )
        return pool(kv_cache_memory // per_block, "kv_cache_memory")
    device = getattr(model, "device", torch.device("cpu"))
    if device.type != "cuda":
        wanted = -(-max_num_seqs * max_model_len // block_size)
        return pool(max(min(wanted, DEFAULT_CPU_KV_BYTES // per_block), 1), "the CPU default (at most 1 GiB)")
    peak, total, non_torch = profile_memory(model, max_num_batched_tokens, max_num_seqs, block_size, max_model_len)
    budget = kv_budget(total, gpu_memory_utilization, peak, non_torch)
    if budget < one_sequence:
        raise ValueError(
            f"gpu_memory_utilization {gpu_memory_utilization} of {total / GIB:.2f} GiB leaves "
            f"{max(budget, 0) / GIB:.3f} GiB for the KV cache after the weights and activations "
            f"({peak / GIB:.2f} GiB) and other memory on the device ({non_torch / GIB:.2f} GiB); one sequence of "
            f"max_model_len ({max_model_len} tokens) needs {one_sequence / GIB:.3f} GiB: raise "
            f"gpu_memory_utilization, lower max_model_len or max_num_batched_tokens"
        )
    return pool(budget // per_block, f"gpu_memory_utilization={gpu_memory_utilization} of {total / GIB:.1f} GiB")


def kv_budget(total: int, utilization: float, peak_torch: int, non_torch: int) -> int:
    """Bytes left for KV blocks: the allowed share of the device, less what torch peaked at without a cache
    (weights and one full step's activations) and what others hold (CUDA context, other processes)."""
    return int(total * utilization) - peak_torch - non_torch


def profile_batch(
    max_num_batched_tokens: int, max_num_seqs: int, block_size: int, max_model_len: int
) -> tuple[list[int], list[list[int]], int]:
    """A worst-case step: as many tokens as a step may hold, over as many sequences as may run (so the logits
    are as tall as they get too). Returns query lengths, block tables and the number of blocks they use."""
    seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
    tokens = min(max_num_batched_tokens, seqs * max_model_len)
    lengths = [tokens // seqs + (1 if i < tokens % seqs else 0) for i in range(seqs)]
    tables, used = [], 0
    for length in lengths:
        count = -(-length // block_size)
        tables.append(list(range(used, used + count)))
        used += count
    return lengths, tables, used


def run_profile_step(
    model: Any, max_num_batched_tokens: int, max_num_seqs: int, block_size: int, max_model_len: int
) -> tuple[torch.Tensor, int]:
    """Run the worst-case step over a cache just large enough for it; returns the logits and the cache bytes."""
    lengths, tables, num_blocks = profile_batch(max_num_batched_tokens, max_num_seqs, block_size, max_model_len)
    caches = model.allocate_kv_cache(num_blocks, block_size)
    meta = AttentionMetadata.build(lengths, [0] * len(lengths), tables, block_size, model.device)
    tokens = sum(lengths)
    input_ids = torch.zeros(tokens, dtype=torch.int64, device=model.device)
    positions = torch.cat([torch.arange(n, device=model.device) for n in lengths])
    logits = model.forward(input_ids, positions, meta, caches)
    logits = torch.softmax(logits, dim=-1)  # the sampler's float32 [seqs, vocab] working set
    return logits, sum(c.numel() * c.element_size() for c in caches)


def profile_memory(
    model: Any, max_num_batched_tokens: int, max_num_seqs: int, block_size: int, max_model_len: int
) -> tuple[int, int, int]:
    """(torch's peak bytes without the cache, the device's total bytes, bytes held outside torch) on a GPU."""
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    logits, cache_bytes = run_profile_step(model, max_num_batched_tokens, max_num_seqs, block_size, max_model_len)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache_bytes
    del logits
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    return peak, total, non_torch

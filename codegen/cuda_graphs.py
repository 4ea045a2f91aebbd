"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A small model's decode step is hundreds of short kernel launches; replaying a captured graph removes the
launch overhead. Only backend "triton" can be captured: its decode path makes no host sync (the attention
launcher knows a step is decode when tokens == sequences), while the reference attention reads seq_lens on the
host. A batch is padded up to its bucket: padded rows write cache slot -1 (skipped by the cache-write kernel),
attend over one key of block 0, and their logits are dropped.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kiln.ops.metadata import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 8 up to max_num_seqs (vLLM's)."""
    sizes = [s for s in (1, 2, 4, *range(8, max_num_seqs, 8)) if s < max_num_seqs]
    return (*sizes, max_num_seqs)


class StepModel(Protocol):
    """What DecodeGraphs drives: one packed step of a compiled model (kiln.compiler.compiled.CompiledModel)."""

    backend: str
    device: torch.device

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor: ...


class DecodeGraphs:
    """Call like the CompiledModel; decode batches up to the largest bucket replay a graph, others run eagerly."""

    def __init__(
        self, compiled: StepModel, kv_caches: list[torch.Tensor], max_blocks_per_seq: int, buckets: tuple[int, ...]
    ) -> None:
        if compiled.backend != "triton" or compiled.device.type != "cuda":
            raise ValueError("CUDA graphs need a model compiled with backend='triton' on a CUDA device")
        self.compiled, self.kv_caches, self.max_blocks = compiled, kv_caches, max_blocks_per_seq
        self.buckets = sorted(buckets)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _static_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        dev = self.compiled.device
        return {
            "input_ids": torch.zeros(batch, dtype=torch.int64, device=dev),
            "positions": torch.zeros(batch, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((batch,), -1, dtype=torch.int64, device=dev),
            "block_tables": torch.zeros(batch, self.max_blocks, dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(batch, dtype=torch.int32, device=dev),
            "query_start_loc": torch.arange(batch + 1, dtype=torch.int32, device=dev),
            "logits_indices": torch.arange(batch, dtype=torch.int64, device=dev),
        }

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=inputs["slot_mapping"],
            block_tables=inputs["block_tables"],
            seq_lens=inputs["seq_lens"],
            query_start_loc=inputs["query_start_loc"],
            logits_indices=inputs["logits_indices"],
            max_query_len=1,  # a decode step
        )
        return self.compiled(inputs["input_ids"], inputs["positions"], meta, self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that smaller graphs reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.buckets):
            inputs = self._static_inputs(batch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
                for _ in range(2):
                    self._run(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._run(inputs)
            self.graphs[batch] = (graph, inputs, out)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        bucket = next((b for b in self.buckets if b >= n), None)
        if n != meta.seq_lens.shape[0] or bucket is None or bucket not in self.graphs or width > self.max_blocks:
            return self.compiled(input_ids, positions, meta, kv_caches or self.kv_caches)
        graph, inputs, out = self.graphs[bucket]
        inputs["input_ids"][:n].copy_(input_ids)
        inputs["positions"][:n].copy_(positions)
        inputs["slot_mapping"][:n].copy_(meta.slot_mapping)
        inputs["slot_mapping"][n:].fill_(-1)
        inputs["block_tables"][:n, :width].copy_(meta.block_tables)
        inputs["seq_lens"][:n].copy_(meta.seq_lens)
        inputs["seq_lens"][n:].fill_(1)
        graph.replay()
        return out[:n]

"""The device side of a step: the KV cache, persistent input buffers, the forward, sampling on the device.

A step's inputs are written into one pinned host buffer (numpy views, no per-step tensor allocation) and reach
the device in one non-blocking copy. Block tables live on the device in persistent rows, one per running
sequence: a step sends only the block ids that are new since the sequence's last step (a decode step adds one
block per sequence every `block_size` tokens) and gathers the rows of its batch on the device. Sampling runs on
the logits' device and only the sampled ids (and the logprobs asked for) come back to the host.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.ops.metadata import AttentionMetadata
from .sampler import Sampler, SamplerOutput
from .sequence import Sequence


class _Row:
    """Where a sequence's block table lives on the device and how much of it is there."""

    __slots__ = ("index", "table", "written")

    def __init__(self, index: int) -> None:
        self.index = index
        self.table: list[int] | None = None  # the seq.block_table list last written (free() replaces it)
        self.written = 0


class ModelRunner:
    """Owns the KV cache and the per-step buffers of one model; `run` does a step, returning host samples."""

    def __init__(self, model: Any, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int,
                 sampler: Sampler, enforce_eager: bool = False) -> None:
        self.model, self.device, self.block_size, self.sampler = model, model.device, block_size, sampler
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.max_blocks = -(-max_model_len // block_size)
        self.num_rows = 2 * max_num_seqs  # spare rows: a preempted or waiting sequence keeps its row a while
        self.table = torch.zeros(self.num_rows, self.max_blocks, dtype=torch.int32, device=self.device)
        self.host_table = self.table.numpy() if self.device.type == "cpu" else \
            np.zeros((self.num_rows, self.max_blocks), dtype=np.int32)  # host mirror for slot computation
        self.rows: dict[int, _Row] = {}
        self.free_rows = list(range(self.num_rows - 1, -1, -1))
        self._staging = torch.empty(0, dtype=torch.int64)
        self.forward = model.forward if enforce_eager else _decode_graphs(model, self.kv_caches, max_model_len,
                                                                          block_size, max_num_seqs)

    # Inputs ----------------------------------------------------------------------------------------------

    def _new_row(self, seq: Sequence, seqs: list[Sequence]) -> _Row:
        if not self.free_rows:  # recycle the rows of sequences that are not in this step
            batch = {s.seq_id for s in seqs}
            for seq_id in [k for k in self.rows if k not in batch]:
                self.free_rows.append(self.rows.pop(seq_id).index)
        row = self.rows[seq.seq_id] = _Row(self.free_rows.pop())
        return row

    def release(self, seq: Sequence) -> None:
        """Give back a finished sequence's row."""
        row = self.rows.pop(seq.seq_id, None)
        if row is not None:
            self.free_rows.append(row.index)

    def _staging_buffer(self, size: int) -> np.ndarray:
        if self._staging.numel() < size:
            pin = self.device.type == "cuda"
            self._staging = torch.empty(max(size, 2 * self._staging.numel()), dtype=torch.int64, pin_memory=pin)
        return self._staging.numpy()

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                           AttentionMetadata]:
        """input_ids, positions and attention metadata for seqs each adding num_new tokens after their
        computed ones, built in the staging buffer and sent to the device in one copy."""
        bs, num_seqs, tokens = self.block_size, len(seqs), sum(num_new)
        row_index: list[int] = []
        upd_rows: list[int] = []
        upd_cols: list[int] = []
        upd_vals: list[int] = []
        width = 1
        for seq in seqs:  # one pass: each sequence's row, and the block ids its row does not hold yet
            row = self.rows.get(seq.seq_id) or self._new_row(seq, seqs)
            table = seq.block_table
            length = len(table)
            if row.table is not table:
                row.table, row.written = table, 0
            if length > row.written:
                new = table[row.written:]
                self.host_table[row.index, row.written:length] = new
                upd_rows.extend([row.index] * len(new))
                upd_cols.extend(range(row.written, length))
                upd_vals.extend(new)
                row.written = length
            row_index.append(row.index)
            width = max(width, length)
        updates = len(upd_vals)
        # Layout: ids, positions, slots [T] | logits_indices, row index, seq_lens, query starts [S] (+1) | updates.
        buf = self._staging_buffer(3 * tokens + 4 * num_seqs + 1 + 3 * updates)
        ids, pos, slots = buf[:tokens], buf[tokens:2 * tokens], buf[2 * tokens:3 * tokens]
        o = 3 * tokens
        logits_idx, row_idx = buf[o:o + num_seqs], buf[o + num_seqs:o + 2 * num_seqs]
        seq_lens, starts = buf[o + 2 * num_seqs:o + 3 * num_seqs], buf[o + 3 * num_seqs:o + 4 * num_seqs + 1]
        upd = buf[o + 4 * num_seqs + 1:o + 4 * num_seqs + 1 + 3 * updates]
        context = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64, count=num_seqs)
        row_idx[:] = row_index
        if tokens == num_seqs:  # decode: one token per sequence, the one after its context
            ids[:] = [s.token_ids[c] for s, c in zip(seqs, context.tolist())]
            pos[:] = context
            starts[:] = np.arange(num_seqs + 1)
            seq_index = np.arange(num_seqs)
        else:
            query = np.asarray(num_new, dtype=np.int64)
            starts[0] = 0
            np.cumsum(query, out=starts[1:])
            ids[:] = [t for s, c, n in zip(seqs, context.tolist(), num_new) for t in s.token_ids[c:c + n]]
            seq_index = np.repeat(np.arange(num_seqs), query)
            pos[:] = np.arange(tokens) - (starts[:-1] - context)[seq_index]
        seq_lens[:] = context + np.asarray(num_new, dtype=np.int64)
        logits_idx[:] = starts[1:] - 1
        slots[:] = self.host_table[row_idx[seq_index], pos // bs].astype(np.int64) * bs + pos % bs
        if updates:
            upd[:updates], upd[updates:2 * updates], upd[2 * updates:] = upd_rows, upd_cols, upd_vals
        dev = self._to_device(o + 4 * num_seqs + 1 + 3 * updates)
        if updates and self.device.type != "cpu":  # on the CPU the host table is the table
            u = dev[o + 4 * num_seqs + 1:]
            self.table[u[:updates], u[updates:2 * updates]] = u[2 * updates:].to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=dev[2 * tokens:3 * tokens],
            block_tables=self.table[dev[o + num_seqs:o + 2 * num_seqs], :width],
            seq_lens=dev[o + 2 * num_seqs:o + 3 * num_seqs].to(torch.int32),
            query_start_loc=dev[o + 3 * num_seqs:o + 4 * num_seqs + 1].to(torch.int32),
            logits_indices=dev[o:o + num_seqs],
            max_query_len=max(num_new),
        )
        return dev[:tokens], dev[tokens:2 * tokens], meta

    def _to_device(self, size: int) -> torch.Tensor:
        """The first `size` staging entries on the device: one non-blocking copy from pinned memory (a view on
        the CPU, where nothing needs to move). The buffer is rewritten next step, which is safe because every
        step ends by waiting for its sampled ids, queued after this copy; an overlapped engine would need two."""
        host = self._staging[:size]
        if self.device.type == "cpu":
            return host
        return host.to(self.device, non_blocking=True)

    # The step --------------------------------------------------------------------------------------------

    def run(self, seqs: list[Sequence], num_new: list[int], sample_rows: list[int]) -> SamplerOutput | None:
        """Forward over the packed batch, then sample the rows in `sample_rows` (sequences whose context is
        now complete) on the device; returns their tokens on the host, None when no row samples."""
        input_ids, positions, meta = self.prepare(seqs, num_new)
        logits = self.forward(input_ids, positions, meta, self.kv_caches)
        if not sample_rows:
            return None
        if len(sample_rows) != len(seqs):
            logits = logits[torch.tensor(sample_rows, device=logits.device)]
        return self.sampler.sample(logits.float(), [seqs[i] for i in sample_rows]).to_host()


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 8 up to max_num_seqs (vLLM's)."""
    sizes = [s for s in (1, 2, 4, *range(8, max_num_seqs, 8)) if s < max_num_seqs]
    return (*sizes, max_num_seqs)


def _decode_graphs(model: Any, kv_caches: list, max_model_len: int, block_size: int, max_num_seqs: int) -> Any:
    """On a GPU with generated kernels, decode steps replay CUDA graphs (one per capture size); else eager."""
    if getattr(model, "backend", None) != "triton" or getattr(model, "device", None) is None \
            or model.device.type != "cuda":
        return model.forward
    from kiln.codegen.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(model, kv_caches, max_blocks_per_seq=-(-max_model_len // block_size),
                          buckets=capture_sizes(max_num_seqs))
    graphs.capture()
    return graphs

"""The device side of a step: the KV cache, persistent input buffers, the forward, sampling on the device.

A step's inputs are written into one pinned host buffer (numpy views, no per-step tensor allocation) and reach
the device in one non-blocking copy. Block tables live on the device in persistent rows, one per running
sequence: a step sends only the block ids that are new since the sequence's last step (a decode step adds one
block per sequence every `block_size` tokens) and gathers the rows of its batch on the device. Sampling runs on
the logits' device and only the sampled ids (and the logprobs asked for) come back to the host.

An input token still being sampled by the previous step (a placeholder, see sequence.py) is taken from that
step's sampled ids on the device, so a step can be launched before the previous one's tokens reach the host.
Two staging buffers alternate, so the host writes step N+1's inputs while step N's copy may still read its own.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from kiln.ops.metadata import AttentionMetadata

from .grammar import GrammarCompiler
from .prompt_logprobs import score_prompts
from .sampler import DeviceSample, Sampler
from .sampling_ops import to_device
from .scheduler import SchedulerOutput
from .sequence import Sequence
from .speculative.verify import sample_with_drafts

logger = logging.getLogger("kiln")


class _Row:
    """Where a sequence's block table lives on the device and how much of it is there."""

    __slots__ = ("index", "table", "written")

    def __init__(self, index: int) -> None:
        self.index = index
        self.table: list[int] | None = None  # the seq.block_table list last written (free() replaces it)
        self.written = 0


class ModelRunner:
    """Owns the KV cache and the per-step buffers of one model; `run` does a step, returning host samples."""

    def __init__(
        self,
        model: Any,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        sampler: Sampler,
        enforce_eager: bool = False,
    ) -> None:
        self.model, self.device, self.block_size, self.sampler = model, model.device, block_size, sampler
        self.kv_caches = model.allocate_kv_cache(num_blocks, block_size)
        self.max_blocks = -(-max_model_len // block_size)
        self.num_rows = 2 * max_num_seqs  # spare rows: a preempted or waiting sequence keeps its row a while
        self.table = torch.zeros(self.num_rows, self.max_blocks, dtype=torch.int32, device=self.device)
        self.host_table = (
            self.table.numpy()
            if self.device.type == "cpu"
            else np.zeros((self.num_rows, self.max_blocks), dtype=np.int32)
        )  # host mirror for slot computation
        self.rows: dict[int, _Row] = {}
        self.free_rows = list(range(self.num_rows - 1, -1, -1))
        self._staging = [torch.empty(0, dtype=torch.int64)] * 2
        self._copied: list[torch.cuda.Event | None] = [None, None]  # each buffer's last copy to the GPU
        self._step = 0
        self.last_sampled: torch.Tensor | None = None  # the previous step's sampled ids, on the device
        self.grammars: GrammarCompiler | None = None  # set by the engine: the token masks of constrained rows
        self.forward = (
            model.forward
            if enforce_eager
            else _decode_graphs(model, self.kv_caches, max_model_len, block_size, max_num_seqs)
        )

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

    def _staging_buffer(self, size: int) -> torch.Tensor:
        """This step's pinned staging buffer (of two, alternating), grown when too small. A buffer is rewritten
        two steps after its copy was queued; should that copy still be pending (the step between sampled
        nothing, so the engine did not wait for it) the host waits for the copy, never for the forward."""
        self._step ^= 1
        copied = self._copied[self._step]
        if copied is not None:
            copied.synchronize()
        if self._staging[self._step].numel() < size:
            pin = self.device.type == "cuda"
            self._staging[self._step] = torch.empty(
                max(size, 2 * self._staging[self._step].numel()), dtype=torch.int64, pin_memory=pin
            )
        return self._staging[self._step]

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids, positions and attention metadata for the step's sequences, each adding num_new tokens
        after its context, built in a staging buffer and sent to the device in one copy."""
        seqs, num_new = out.seqs, out.num_new_tokens
        bs, num_seqs, tokens = self.block_size, len(seqs), out.num_batched_tokens
        row_index: list[int] = []
        upd_rows: list[int] = []
        upd_cols: list[int] = []
        upd_vals: list[int] = []
        rows, append = self.rows, row_index.append
        for seq in seqs:  # one pass: each sequence's row, and the block ids its row does not hold yet
            row = rows.get(seq.seq_id) or self._new_row(seq, seqs)
            table = seq.block_table
            if row.table is not table or len(table) > row.written:  # a new block (one step in block_size)
                if row.table is not table:
                    row.table, row.written = table, 0
                new = table[row.written :]
                self.host_table[row.index, row.written : len(table)] = new
                upd_rows.extend([row.index] * len(new))
                upd_cols.extend(range(row.written, len(table)))
                upd_vals.extend(new)
                row.written = len(table)
            append(row.index)
        updates = len(upd_vals)
        # Layout (int64 slots): ids, positions, slots [T] | logits_indices [R], row index [S] | seq_lens [S] and
        # query starts [S + 1] as int32, two to a slot | block-table updates (row, column, block id) [3U].
        # R is one logits row per sequence (its last token) plus the extra rows out.num_logits asks for.
        num_logits = out.num_logits
        num_rows = num_seqs + sum(num_logits.values()) - len(num_logits)
        o, o32 = 3 * tokens, 3 * tokens + num_rows + num_seqs
        end32 = o32 + num_seqs + 1  # (2S + 1) int32 fit in S + 1 slots
        staging = self._staging_buffer(end32 + 3 * updates)
        buf = staging.numpy()
        ids, pos, slots = buf[:tokens], buf[tokens : 2 * tokens], buf[2 * tokens : 3 * tokens]
        logits_idx, row_idx = buf[o : o + num_rows], buf[o + num_rows : o32]
        ints = buf[o32:end32].view(np.int32)
        seq_lens, starts = ints[:num_seqs], ints[num_seqs : 2 * num_seqs + 1]
        upd = buf[end32 : end32 + 3 * updates]
        context = np.asarray(out.context, dtype=np.int64)
        row_idx[:] = row_index
        if tokens == num_seqs:  # decode: one token per sequence, the one after its context
            ids[:] = [s.token_ids[c] for s, c in zip(seqs, out.context)]
            pos[:] = context
            starts[:] = np.arange(num_seqs + 1)
            seq_lens[:] = context + 1
            seq_index = np.arange(num_seqs)
        else:
            query = np.asarray(num_new, dtype=np.int64)
            starts[0] = 0
            np.cumsum(query, out=starts[1:])
            drafts = out.drafts  # a verified sequence runs its last token and the proposals
            ids[:] = [
                t
                for i, (s, c, n) in enumerate(zip(seqs, out.context, num_new))
                for t in (s.token_ids[c : c + n] if i not in drafts else [s.token_ids[c], *drafts[i]])
            ]
            seq_index = np.repeat(np.arange(num_seqs), query)
            pos[:] = np.arange(tokens) - (starts[:-1] - context)[seq_index]
            seq_lens[:] = context + query
        if num_logits:
            ends = starts[1:].tolist()
            logits_idx[:] = [r for i, end in enumerate(ends) for r in range(end - num_logits.get(i, 1), end)]
        else:
            logits_idx[:] = starts[1:] - 1
        width = -(-int(seq_lens.max()) // bs)  # the blocks the longest context reads
        slots[:] = self.host_table[row_idx[seq_index], pos // bs].astype(np.int64) * bs + pos % bs
        if updates:
            upd[:updates], upd[updates : 2 * updates], upd[2 * updates :] = upd_rows, upd_cols, upd_vals
        dev = self._to_device(staging[: end32 + 3 * updates])
        if updates and self.device.type != "cpu":  # on the CPU the host table is the table
            u = dev[end32:]
            self.table[u[:updates], u[updates : 2 * updates]] = u[2 * updates :].to(torch.int32)
        dev32 = dev[o32:end32].view(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=dev[2 * tokens : 3 * tokens],
            block_tables=self.table[dev[o + num_rows : o32], :width],
            seq_lens=dev32[:num_seqs],
            query_start_loc=dev32[num_seqs : 2 * num_seqs + 1],
            logits_indices=dev[o : o + num_rows],
            max_query_len=max(num_new),
        )
        input_ids = dev[:tokens]
        if ids.min() < 0:  # tokens the previous step is sampling: take them from its ids on the device
            assert self.last_sampled is not None
            input_ids = torch.where(input_ids < 0, self.last_sampled[(-1 - input_ids).clamp_(min=0)], input_ids)
        return input_ids, dev[tokens : 2 * tokens], meta

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Staging entries on the device: one non-blocking copy from pinned memory (the view itself on the CPU,
        where nothing needs to move)."""
        if self.device.type == "cpu":
            return host
        dev = host.to(self.device, non_blocking=True)
        copied = self._copied[self._step] = torch.cuda.Event()
        copied.record()
        return dev

    # The step --------------------------------------------------------------------------------------------

    def launch(self, out: SchedulerOutput) -> DeviceSample | None:
        """Queue the forward over the packed batch and the sampling of `out.sample_rows` on the device, without
        waiting for either; None when no row samples. The result's copy to the host is already under way."""
        input_ids, positions, meta = self.prepare(out)
        rows, seqs = out.sample_rows, out.seqs
        if len(rows) != len(seqs):
            seqs = [seqs[i] for i in rows]
        masks = (
            self.grammars.start_masks(seqs, self.device) if self.grammars is not None else None
        )  # beside the forward
        logits = self.forward(input_ids, positions, meta, self.kv_caches)
        if out.scored:
            score_prompts(logits, out)
        if not rows:
            return None
        if out.drafts:  # speculative decoding: verify the proposals (synchronously)
            sample = sample_with_drafts(self.sampler, logits, out, masks)
            self.last_sampled = sample.token_ids
            return sample
        if out.num_logits:
            logits = logits[to_device(_last_rows(out.num_logits, len(out.seqs)), torch.int64, logits.device)]
        if len(rows) != len(out.seqs):
            logits = logits[to_device(rows, torch.int64, logits.device)]
        logits = logits.float()
        try:
            sample = self.sampler.sample(logits, seqs, masks)
        except Exception:  # noqa: BLE001 - one request's parameters must not fail the others
            logger.exception("kiln: sampling the batch failed; sampling its rows apart")
            sample = self.sampler.sample_apart(logits, seqs, masks)
        self.last_sampled = sample.token_ids
        sample.start_copy()
        return sample


def _last_rows(num_logits: dict[int, int], num_seqs: int) -> list[int]:
    """Each sequence's last logits row, when some sequences have several."""
    last, end = [], 0
    for i in range(num_seqs):
        end += num_logits.get(i, 1)
        last.append(end - 1)
    return last


def _decode_graphs(model: Any, kv_caches: list, max_model_len: int, block_size: int, max_num_seqs: int) -> Any:
    """On a GPU with generated kernels, decode steps replay CUDA graphs (one per capture size); else eager."""
    if (
        getattr(model, "backend", None) != "triton"
        or getattr(model, "tensor_parallel_size", 1) > 1  # each step is announced to the workers: eager
        or getattr(model, "device", None) is None
        or model.device.type != "cuda"
    ):
        return model.forward
    from kiln.codegen.cuda_graphs import DecodeGraphs, capture_sizes

    graphs = DecodeGraphs(
        model, kv_caches, max_blocks_per_seq=-(-max_model_len // block_size), buckets=capture_sizes(max_num_seqs)
    )
    graphs.capture()
    return graphs

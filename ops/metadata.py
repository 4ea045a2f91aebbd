"""The per-step inputs that tell `kiln::paged_attention` where each packed token belongs.

One forward call runs a packed stream of T tokens drawn from S sequences (prefill chunks and decode tokens
mixed). The runtime builds this once per step; the compiled graph takes its tensors as inputs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where the step's tokens go in the paged KV cache and which context each one attends to.

    slot_mapping:    [T] int64, cache slot (block_id * block_size + offset) written by each new token.
    block_tables:    [S, max_blocks] int32, the blocks of each sequence in order (padding is ignored).
    seq_lens:        [S] int32, tokens in each sequence's context after this step (cached + new).
    query_start_loc: [S + 1] int32, cumulative count of new tokens; sequence s owns tokens
                     query_start_loc[s]:query_start_loc[s + 1] of the packed stream.
    logits_indices:  [R] int64, the packed indices of the tokens whose logits the step needs (the only rows
                     that reach the LM head): each sequence's last new token, and for a sequence verifying
                     speculative proposals its last 1 + k (R = S otherwise).
    max_query_len:   the longest sequence's new-token count, known on the host (not a graph input): kernels
                     size their grids with it instead of reading query_start_loc back from the device.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int | None = None

    def graph_inputs(self) -> list[torch.Tensor]:
        """The tensors in the order the compiled graph's metadata placeholders expect them."""
        return [self.slot_mapping, self.block_tables, self.seq_lens, self.query_start_loc, self.logits_indices]

    @staticmethod
    def input_names() -> list[str]:
        return ["slot_mapping", "block_tables", "seq_lens", "query_start_loc", "logits_indices"]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences that each add query_lens[s] tokens after context_lens[s] cached ones."""
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for pos in range(c, c + q):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([q + c for q, c in zip(query_lens, context_lens)], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            logits_indices=torch.tensor([s - 1 for s in starts[1:]], dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
        )


_step = threading.local()


@contextlib.contextmanager
def step_context(meta: AttentionMetadata) -> Iterator[None]:
    """Make the step's host-side facts (max_query_len) visible to kernel launchers inside the forward, which
    only receive the metadata tensors (vLLM's forward context, for the same reason)."""
    previous = getattr(_step, "max_query_len", None)
    _step.max_query_len = meta.max_query_len
    try:
        yield
    finally:
        _step.max_query_len = previous


def current_max_query_len() -> int | None:
    """The running step's longest query, when its runner knew it; None otherwise."""
    return getattr(_step, "max_query_len", None)

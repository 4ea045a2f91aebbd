"""Pack one scheduled step into the tensors `CompiledModel.forward` takes.

Equivalent to `AttentionMetadata.build`, but the slot mapping and positions are computed with a handful of
tensor ops instead of a Python loop per token, which matters on decode steps where the model itself is cheap.
"""
from __future__ import annotations

import torch

from ..compiler.metadata import AttentionMetadata
from .sequence import Sequence


def prepare_inputs(seqs: list[Sequence], num_new_tokens: list[int], block_size: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids [T], positions [T] and metadata for seqs each adding num_new_tokens after their computed ones."""
    num_seqs = len(seqs)
    context = [s.num_computed_tokens for s in seqs]
    decode_only = len(num_new_tokens) == sum(num_new_tokens)
    if decode_only:
        ids = [s.token_ids[c] for s, c in zip(seqs, context)]
    else:
        ids = []
        for s, c, n in zip(seqs, context, num_new_tokens):
            ids.extend(s.token_ids[c:c + n])
    width = max(len(s.block_table) for s in seqs)
    tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
    context_t = torch.tensor(context, dtype=torch.int64)
    query_lens = torch.tensor(num_new_tokens, dtype=torch.int64)
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(query_lens, 0, out=query_start_loc[1:])
    if decode_only:
        seq_index = torch.arange(num_seqs)
        positions = context_t
    else:
        seq_index = torch.repeat_interleave(torch.arange(num_seqs), query_lens, output_size=len(ids))
        positions = torch.arange(len(ids)) - (query_start_loc[:-1] - context_t)[seq_index]
    slot_mapping = tables[seq_index, positions // block_size].long() * block_size + positions % block_size
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        block_tables=tables.to(device),
        seq_lens=(context_t + query_lens).to(torch.int32).to(device),
        query_start_loc=query_start_loc.to(torch.int32).to(device),
        logits_indices=(query_start_loc[1:] - 1).to(device),
    )
    input_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    return input_ids, positions.to(device), meta

"""Drive a CompiledModel step by step over a paged cache, the way the runtime does, to compare with HF."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kiln.models.registry import family_for
from kiln.ops.metadata import AttentionMetadata


def hf_reference(path: str | Path, **kwargs) -> torch.nn.Module:
    """HF's model in its family's attention form (kiln exports the same one): a default that drops part of the
    model is not the reference. transformers 5.17 picks sdpa for Gemma-2, which ignores its logit soft-capping."""
    attn = family_for(AutoConfig.from_pretrained(path)).attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs).eval()


def run_prefill_then_decode(compiled, prompts: list[list[int]], steps: int, block_size: int = 4):
    """Packed prefill of all prompts, then `steps` greedy decode steps; returns (sequences, logits per step)."""
    max_len = max(len(p) for p in prompts) + steps + 1
    per_seq = -(-max_len // block_size)
    # Interleave block ids across sequences so a wrong block table cannot go unnoticed.
    tables = [[b * len(prompts) + s + 1 for b in range(per_seq)] for s in range(len(prompts))]
    caches = compiled.allocate_kv_cache(per_seq * len(prompts) + 1, block_size)
    seqs = [list(p) for p in prompts]
    meta = AttentionMetadata.build([len(p) for p in seqs], [0] * len(seqs), tables, block_size)
    ids = torch.tensor([t for p in seqs for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in seqs])
    all_logits = [compiled(ids, pos, meta, caches)]
    for _ in range(steps):
        nxt = all_logits[-1].argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
        ctx = [len(s) - 1 for s in seqs]
        meta = AttentionMetadata.build([1] * len(seqs), ctx, tables, block_size)
        all_logits.append(compiled(torch.tensor(nxt), torch.tensor(ctx), meta, caches))
    return seqs, all_logits


@torch.no_grad()
def hf_last_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor(tokens)[None]).logits[0, -1].float()


def greedy_agrees(kiln_tokens: list[int], hf_tokens: list[int], hf_scores: list[torch.Tensor], tie: float) -> bool:
    """Equal tokens, where a difference counts as agreement from a step where HF's top two were within `tie`."""
    for i, (a, b) in enumerate(zip(kiln_tokens, hf_tokens)):
        if a != b:
            top2 = torch.topk(hf_scores[i].float(), 2).values
            return bool(top2[0] - top2[1] <= tie)
    return len(kiln_tokens) == len(hf_tokens)

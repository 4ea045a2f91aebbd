"""Turn a step's logits into next tokens, vectorised over the batch.

The common case (every sequence greedy, no penalties, no logprobs) is a single argmax. Otherwise penalties,
min_tokens, temperature, top-k, top-p and min-p are applied as batched tensor ops, and only sequences with a
seed draw one by one, from their own generator, so that the same seed gives the same tokens whatever else
shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams
from .sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per sequence: (logprob of the sampled token, {token_id: logprob} top-k + sampled), None if not asked.
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None


class Sampler:
    """Stateless apart from the EOS ids that min_tokens has to hold back."""

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [s.params for s in seqs]
        if all(p.temperature == 0.0 and not p.has_penalties and p.logprobs is None for p in params) and \
                not any(s.num_output_tokens < s.params.min_tokens for s in seqs):
            return SamplerOutput(logits.argmax(dim=-1).tolist())
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        self._apply_penalties(logits, seqs)
        self._apply_min_tokens(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sample_rows = [i for i, p in enumerate(params) if p.temperature > 0.0]
        if sample_rows:
            rows = torch.tensor(sample_rows)
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sample_rows])
        token_ids = tokens.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_ids)
        return SamplerOutput(token_ids, _gather_logprobs(raw_logprobs, token_ids, params))

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return
        vocab = logits.shape[-1]
        sub = logits[rows]
        outputs = _padded([seqs[i].output_token_ids for i in rows], pad=vocab)
        counts = torch.zeros(len(rows), vocab + 1).scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
        counts = counts[:, :vocab]
        prompts = _padded([seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in rows], pad=vocab)
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool).scatter_(1, prompts, True)[:, :vocab] | (counts > 0)
        p = [seqs[i].params for i in rows]
        rep = torch.tensor([x.repetition_penalty for x in p])[:, None]
        freq = torch.tensor([x.frequency_penalty for x in p])[:, None]
        pres = torch.tensor([x.presence_penalty for x in p])[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).float()
        logits[rows] = sub

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids or []) + ([] if p.ignore_eos else self.eos_token_ids)
                banned = [t for t in banned if t < logits.shape[-1]]
                if banned:
                    logits[i, banned] = float("-inf")

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p, then one draw per row."""
        params = [s.params for s in seqs]
        vocab = logits.shape[-1]
        logits = logits / torch.tensor([p.temperature for p in params])[:, None]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
        top_p = torch.tensor([p.top_p for p in params])
        min_p = torch.tensor([p.min_p for p in params])
        if bool((top_k < vocab).any() or (top_p < 1.0).any()):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab)[None, :]
            drop = ranks >= top_k[:, None]
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop |= (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p[:, None]  # keep the token crossing p
            drop[:, 0] = False
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        out = torch.empty(len(seqs), dtype=torch.int64)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            idx = torch.tensor(unseeded)
            out[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=seq.generator).item()
        return out


def _padded(lists: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(x) for x in lists), default=0) or 1
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.int64)


def _gather_logprobs(logprobs: torch.Tensor, token_ids: list[int],
                     params: list[SamplingParams]) -> list[tuple[float, dict[int, float]] | None]:
    """Top-k log-probabilities (of the raw model distribution) plus the sampled token's, per requesting row."""
    result: list[tuple[float, dict[int, float]] | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        row = logprobs[i]
        chosen = float(row[token_ids[i]])
        top = {}
        if p.logprobs > 0:
            values, ids = row.topk(p.logprobs)
            top = dict(zip(ids.tolist(), values.tolist()))
        top[token_ids[i]] = chosen
        result.append((chosen, top))
    return result

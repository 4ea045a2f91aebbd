"""Turn a step's logits into next tokens on the logits' device, vectorised over the batch.

`Sampler.sample` queues batched tensor ops only: which ops run is decided from the requests' SamplingParams
on the host, never by reading a device tensor, so a GPU step does not wait on the GPU and the [batch, vocab]
logits never leave it. Draws use the exponential race (argmax of p / Exp(1) noise), which needs no sync;
seeded sequences take their noise from their own generator, so that a seed gives the same tokens whatever else
shares the batch. `DeviceSample.start_copy` queues the copy of the results to the host, `to_host` waits for it.

A sequence's token being sampled is its last entry in `token_ids` (a placeholder), so "outputs before this
one" is `len(token_ids) - 1 - num_prompt_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import sampling_ops as ops
from .sequence import Sequence, make_generator

if TYPE_CHECKING:
    from .grammar import MaskJob
    from .sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per sequence: (logprob of the sampled token, {token_id: logprob} top-k + sampled), None if not asked.
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    errors: dict[int, str] = field(default_factory=dict)  # rows that could not be sampled, and why
    # Speculative decoding: per verified row, the accepted proposals that follow its token (maybe none).
    extra: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class DeviceSample:
    """A step's sampling results, still on the logits' device."""

    token_ids: torch.Tensor  # [B] int64
    num_logprobs: list[int | None]  # per row, the number of top logprobs asked for (None: no logprobs)
    logprob: torch.Tensor | None = None  # [B] raw logprob of each row's token, when any row asked
    top_ids: torch.Tensor | None = None  # [B, K] ids of the K most likely raw tokens, K = the largest ask
    top_logprobs: torch.Tensor | None = None  # [B, K] their raw logprobs
    _host: list[torch.Tensor] | None = field(default=None, repr=False)  # pinned copies under way
    _copied: torch.cuda.Event | None = field(default=None, repr=False)
    _done: SamplerOutput | None = field(default=None, repr=False)  # already on the host (rows sampled apart)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.token_ids, self.logprob, self.top_ids, self.top_logprobs) if t is not None]

    def start_copy(self) -> None:
        """Queue the copy of the results into pinned host memory (GPU only), so that the host can prepare the
        next step while this one runs; `to_host` then only waits for it."""
        if self.token_ids.device.type != "cuda" or self._done is not None:
            return
        self._host = [t.to("cpu", non_blocking=True) for t in self._tensors()]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def to_host(self) -> SamplerOutput:
        """The results as Python lists: the one wait of a step."""
        if self._done is not None:
            return self._done
        if self._copied is not None:
            self._copied.synchronize()
        tensors = self._host if self._host is not None else self._tensors()
        token_ids = tensors[0].tolist()
        if self.logprob is None:
            return SamplerOutput(token_ids)
        chosen, ids, values = (t.tolist() for t in tensors[1:])
        result: list[tuple[float, dict[int, float]] | None] = []
        for i, n in enumerate(self.num_logprobs):
            if n is None:
                result.append(None)
                continue
            top = dict(zip(ids[i][:n], values[i][:n]))
            top[token_ids[i]] = chosen[i]
            result.append((chosen[i], top))
        return SamplerOutput(token_ids, result)


class Sampler:
    """Stateless apart from the EOS ids that min_tokens has to hold back (seeded RNGs live on the sequences)."""

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.sample(logits, seqs).to_host()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: MaskJob | None = None) -> DeviceSample:
        """Next tokens for float32 `logits` [B, V] (row i belongs to seqs[i]) without leaving logits.device.

        Greedy rows (temperature < 1e-5) take the argmax of the penalised logits; the others are drawn after
        temperature, top-k, top-p and min-p. Logprobs are those of the model distribution, as in vLLM: raw, or
        under the grammar's token mask (`masks`, applied first) for structured-output rows.
        """
        if masks is not None:
            logits = masks.apply(logits)
        if all(len(s.token_ids) >= s.argmax_from for s in seqs):  # the common case: one cheap pass
            return DeviceSample(ops.argmax(logits), [None] * len(seqs))
        params = [s.params for s in seqs]
        x = self._penalised(logits, seqs)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampled) == len(seqs):
            tokens = self._draw(x, seqs)
        else:
            tokens = ops.argmax(x)
            if sampled:
                idx = ops.to_device(sampled, torch.int64, logits.device)
                tokens.index_copy_(0, idx, self._draw(x.index_select(0, idx), [seqs[i] for i in sampled]))
        asked = [p.logprobs for p in params]
        if all(n is None for n in asked):
            return DeviceSample(tokens, asked)
        chosen, top_logprobs, top_ids = ops.logprobs(logits, tokens, max(n for n in asked if n is not None))
        return DeviceSample(tokens, asked, chosen, top_ids, top_logprobs)

    def sample_apart(self, logits: torch.Tensor, seqs: list[Sequence], masks: MaskJob | None = None) -> DeviceSample:
        """Row by row, for a batch whose sampling raised: a row that raises again fails alone (its error is
        reported for its request) and every other row gets the token it would have had in the batch."""
        if masks is not None:
            logits = masks.apply(logits)
        tokens: list[int] = []
        logprobs: list[tuple[float, dict[int, float]] | None] = []
        errors: dict[int, str] = {}
        for i, seq in enumerate(seqs):
            try:
                row = self.sample(logits[i : i + 1], [seq]).to_host()
            except Exception as exc:  # noqa: BLE001 - isolated and reported for this request only
                errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
                tokens.append(0)
                logprobs.append(None)
                continue
            tokens.append(row.token_ids[0])
            logprobs.append(row.logprobs[0] if row.logprobs else None)
        asked = [s.params.logprobs for s in seqs]
        done = SamplerOutput(tokens, logprobs if any(n is not None for n in asked) else None, errors)
        return DeviceSample(ops.to_device(tokens, torch.int64, logits.device), asked, _done=done)

    def _penalised(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logits after penalties, logit_bias and min_tokens: `logits` itself when no row has any (no copy)."""
        vocab = logits.shape[-1]
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if rows:
            p = [seqs[i].params for i in rows]
            prompts = None
            if any(x.repetition_penalty != 1.0 for x in p):
                prompts = [seqs[i].token_ids[: seqs[i].num_prompt_tokens] for i in rows]
            logits = ops.apply_penalties(
                logits,
                rows,
                prompts,
                [seqs[i].output_token_ids for i in rows],
                [(x.repetition_penalty, x.frequency_penalty, x.presence_penalty) for x in p],
            )
            # A tiny repetition penalty divides logits into +-inf; keep them finite so that sampling stays sane.
            logits = logits.clamp_(-ops.LOGIT_LIMIT, ops.LOGIT_LIMIT)
        biased = [(i, s.params.logit_bias) for i, s in enumerate(seqs) if s.params.logit_bias]
        if biased:
            flat = [i * vocab + t for i, bias in biased for t in bias]
            values = [v for _, bias in biased for v in bias.values()]
            logits = ops.add_at(logits, flat, values)
        banned = [
            i * vocab + t
            for i, s in enumerate(seqs)
            if len(s.token_ids) - 1 - s.num_prompt_tokens < s.params.min_tokens
            for t in self._held_back(s)
            if t < vocab
        ]
        return ops.ban(logits, banned) if banned else logits

    def _held_back(self, seq: Sequence) -> list[int]:
        """Tokens that would end the sequence, banned until it has min_tokens outputs."""
        p = seq.params
        return list(p.stop_token_ids or []) + ([] if p.ignore_eos else self.eos_token_ids)

    @staticmethod
    def _draw(x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row (no row greedy) after top-k, top-p and min-p."""
        params = [s.params for s in seqs]
        device = x.device
        temperature = [p.temperature for p in params]
        thr = keep_threshold(x, params)
        noise = torch.empty_like(x)
        seeded = [(i, p.seed) for i, p in enumerate(params) if p.seed is not None]
        if len(seeded) < len(seqs):
            ops.log_exponential_(noise)  # seeded rows are overwritten below
        for i, seed in seeded:
            seq = seqs[i]
            if seq.generator is None:
                seq.generator = make_generator(seed, seq.index, device)
            ops.log_exponential_(noise[i], seq.generator)
        neg_temperature = ops.to_device([[-t] for t in temperature], torch.float32, device)
        return ops.race(x, neg_temperature, noise, thr)


def keep_threshold(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """Per row of `x` ([S, V], row i sampled under params[i]), the smallest logit that its top-k, top-p and
    min-p keep (see ops.keep_threshold); None when no row filters."""
    vocab = x.shape[-1]
    return ops.keep_threshold(
        x,
        [p.temperature for p in params],
        [p.top_k if 0 < p.top_k < vocab else vocab for p in params],
        [p.top_p for p in params],
        [p.min_p for p in params],
    )

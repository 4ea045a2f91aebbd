"""The target's verdict on proposed tokens: which are accepted, and the token that follows them.

A sequence verified with proposals d_1..d_k has k + 1 logit rows: row j is the target's next-token distribution
p_j after d_1..d_j. Greedy: accept the longest prefix with d_{j+1} == argmax p_j, then emit argmax of the first
row not accepted (the bonus token when all are): exactly the tokens greedy decoding emits.

Sampling (Leviathan et al.'s speculative sampling with a deterministic proposal, as n-gram and greedy drafts
are: q is a point mass on d_{j+1}): p_j is the sampler's distribution (temperature, then top-k / top-p / min-p);
d_{j+1} is accepted with probability p_j(d_{j+1}), and on rejection the token is drawn from p_j with d_{j+1}
removed and the rest renormalised, the residual max(0, p - q). Each emitted token is then distributed as
non-speculative sampling would draw it. Draws come from the sequence's own generator when it is seeded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import sampling_ops as ops
from ..sampler import DeviceSample, Sampler, SamplerOutput, keep_threshold
from ..sequence import Sequence, make_generator

if TYPE_CHECKING:
    from ..grammar import MaskJob
    from ..scheduler import SchedulerOutput


def accept_greedy(draft: list[int], targets: list[int]) -> list[int]:
    """The emitted tokens: the proposals matching the target's argmax, then the target's own next token."""
    n = 0
    while n < len(draft) and draft[n] == targets[n]:
        n += 1
    return draft[:n] + [targets[n]]


def verify(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> list[list[int]]:
    """Emitted tokens per sequence (1 to k + 1 each). `logits` [sum(k_i + 1), V] float32 holds each sequence's
    rows in order. One host read for the batch."""
    starts = [0]
    for draft in drafts:
        starts.append(starts[-1] + len(draft) + 1)
    emitted: list[list[int]] = [[] for _ in seqs]
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    drawn = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if greedy:  # the argmax of every row (cheap); the drawn sequences' rows are not read
        targets = ops.argmax(logits).tolist()
        for i in greedy:
            emitted[i] = accept_greedy(drafts[i], targets[starts[i] : starts[i + 1]])
    if not drawn:
        return emitted
    device = logits.device
    rows = [r for i in drawn for r in range(starts[i], starts[i + 1])]
    x = logits.index_select(0, ops.to_device(rows, torch.int64, device))
    accepted, samples = _rejection_sample(x, [seqs[i] for i in drawn], [drafts[i] for i in drawn])
    at = 0
    for i in drawn:
        draft = drafts[i]
        n = 0
        while n < len(draft) and accepted[at + n]:
            n += 1
        emitted[i] = draft[:n] + [samples[at + n]]
        at += len(draft) + 1
    return emitted


def _rejection_sample(x: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> tuple[list[bool], list[int]]:
    """Per row: whether its proposal is accepted (the last row of a sequence has none: False), and the token
    drawn from its residual (the bonus draw, from p itself, on the last row)."""
    device = x.device
    params: list = []
    proposal: list[int] = []
    for seq, draft in zip(seqs, drafts):
        params.extend([seq.params] * (len(draft) + 1))
        proposal.extend([*draft, -1])
    temperature = [p.temperature for p in params]
    thr = keep_threshold(x, params)
    z = x / ops.to_device([[t] for t in temperature], torch.float32, device)
    if thr is not None:
        z.masked_fill_(x < thr, ops.NEG_INF)
    has = ops.to_device([[d >= 0] for d in proposal], torch.bool, device)
    token = ops.to_device([[max(d, 0)] for d in proposal], torch.int64, device)
    p_draft = torch.softmax(z, dim=-1).gather(1, token).squeeze(1)
    uniform = torch.empty_like(p_draft)
    noise = torch.empty_like(z)
    _fill_draws(seqs, drafts, uniform, noise)
    accept = (uniform < p_draft) & has.squeeze(1)
    residual = z.scatter(1, token, torch.where(has, ops.NEG_INF, z.gather(1, token)))
    samples = ops.argmax(residual - noise)
    return accept.tolist(), samples.tolist()


def _fill_draws(seqs: list[Sequence], drafts: list[list[int]], uniform: torch.Tensor, noise: torch.Tensor) -> None:
    """U(0, 1) for the acceptance tests and log Exp(1) noise for the residual draws (the exponential race);
    a seeded sequence's rows from its own generator."""
    if any(s.params.seed is None for s in seqs):
        uniform.uniform_()
        ops.log_exponential_(noise)
    start = 0
    for seq, draft in zip(seqs, drafts):
        end = start + len(draft) + 1
        if seq.params.seed is not None:
            if seq.generator is None:
                seq.generator = make_generator(seq.params.seed, seq.index, uniform.device)
            uniform[start:end].uniform_(generator=seq.generator)
            ops.log_exponential_(noise[start:end], seq.generator)
        start = end


def sample_with_drafts(
    sampler: Sampler, logits: torch.Tensor, out: SchedulerOutput, masks: MaskJob | None = None
) -> DeviceSample:
    """A step's samples when some sequences verify proposals: the others sample their last row as usual (under
    their grammar's mask, `masks` being that of every sampled row), the verified ones (never under a grammar) get
    their emitted tokens (the first as the row's token, the accepted rest in `extra`, an empty list when none
    was accepted). Waits for the results: speculation runs synchronously."""
    seqs, drafts, counts = out.seqs, out.drafts, out.num_logits
    first: list[int] = []
    end = 0
    for i in range(len(seqs)):
        first.append(end)
        end += counts.get(i, 1)
    plain = [i for i, row in enumerate(out.sample_rows) if row not in drafts]
    verified = [i for i, row in enumerate(out.sample_rows) if row in drafts]
    tokens = [0] * len(out.sample_rows)
    done = SamplerOutput(tokens)
    device = logits.device
    if plain:
        plain_seqs = [seqs[out.sample_rows[i]] for i in plain]
        last = [first[row] + counts.get(row, 1) - 1 for row in out.sample_rows]
        x = logits.index_select(0, ops.to_device(last, torch.int64, device)).float()
        if masks is not None:
            x = masks.apply(x)
        x = x.index_select(0, ops.to_device(plain, torch.int64, device))
        try:
            host = sampler.sample(x, plain_seqs).to_host()
        except Exception:  # noqa: BLE001 - one request's parameters must not fail the others
            host = sampler.sample_apart(x, plain_seqs).to_host()
        for j, i in enumerate(plain):
            tokens[i] = host.token_ids[j]
        if host.logprobs is not None:
            done.logprobs = [None] * len(tokens)
            for j, i in enumerate(plain):
                done.logprobs[i] = host.logprobs[j]
        done.errors = {plain[j]: error for j, error in host.errors.items()}
    spec_rows = [out.sample_rows[i] for i in verified]
    rows = [r for row in spec_rows for r in range(first[row], first[row] + counts[row])]
    x = logits.index_select(0, ops.to_device(rows, torch.int64, device)).float()
    emitted = verify(x, [seqs[row] for row in spec_rows], [drafts[row] for row in spec_rows])
    for i, tokens_i in zip(verified, emitted):
        tokens[i] = tokens_i[0]
        done.extra[i] = tokens_i[1:]
    asked = [seqs[row].params.logprobs for row in out.sample_rows]
    return DeviceSample(ops.to_device(tokens, torch.int64, device), asked, _done=done)

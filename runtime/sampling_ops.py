"""Batched tensor ops behind the sampler, on whatever device the logits live.

Each function takes its decisions from host-side Python values (derived from SamplingParams) and never reads
a device tensor back, so a GPU step queues its kernels without waiting on the GPU. Host lists reach the device
through pinned memory and non-blocking copies, which do not wait either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.backends.cpu import kernels as cpu_kernels

NEG_INF = float("-inf")
# Penalised logits are clamped to +-this: finite after any temperature >= 1e-5 in float32 (max 3.4e38).
LOGIT_LIMIT = 1e30


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) for [B, V] logits; on a CPU the C kernel, at memory speed (torch's CPU argmax is a
    scalar loop, ~7x slower, and it is most of a greedy step's host time at batch 256)."""
    if x.dim() == 2 and cpu_kernels.applies(x):
        return cpu_kernels.argmax_rows(x)
    return x.argmax(dim=-1)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`. A copy from pageable memory would wait for the stream to drain;
    a pinned, non-blocking one is queued like a kernel."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def apply_penalties(
    logits: torch.Tensor,
    rows: list[int],
    prompts: list[list[int]] | None,
    outputs: list[list[int]],
    factors: list[tuple[float, float, float]],
) -> torch.Tensor:
    """vLLM's penalties on `rows`, returned as a new tensor: repetition over prompt and output tokens, frequency
    and presence over output tokens. `factors` are (repetition, frequency, presence) per row; `prompts` is None
    when no row has a repetition penalty, which spares building the (long) prompt index."""
    device, vocab = logits.device, logits.shape[-1]
    idx = to_device(rows, torch.int64, device)
    sub = logits.index_select(0, idx)
    out_ids = to_device(_padded(outputs, pad=vocab), torch.int64, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts = counts.scatter_add_(1, out_ids, torch.ones(out_ids.shape, device=device))[:, :vocab]
    present = counts > 0
    rep, freq, pres = to_device(factors, torch.float32, device).unsqueeze(-1).unbind(1)
    if prompts is not None:
        prompt_ids = to_device(_padded(prompts, pad=vocab), torch.int64, device)
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device).scatter_(1, prompt_ids, True)
        seen = seen[:, :vocab] | present
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * present
    return logits.index_copy(0, idx, sub)


def ban(logits: torch.Tensor, flat_ids: list[int]) -> torch.Tensor:
    """A copy of `logits` with the flat positions (row * vocab + token) set to -inf: one fill for the batch."""
    idx = to_device(flat_ids, torch.int64, logits.device)
    return logits.reshape(-1).index_fill(0, idx, NEG_INF).view(logits.shape)


def add_at(logits: torch.Tensor, flat_ids: list[int], values: list[float]) -> torch.Tensor:
    """A copy of `logits` with values added at the flat positions (row * vocab + token): one op for the batch."""
    idx = to_device(flat_ids, torch.int64, logits.device)
    add = to_device(values, logits.dtype, logits.device)
    return logits.reshape(-1).index_add(0, idx, add).view(logits.shape)


def keep_threshold(
    x: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float], min_p: list[float]
) -> torch.Tensor | None:
    """Per row ([S, 1]), the smallest logit that top-k, top-p and min-p all keep, or None if no row filters.

    `top_k` holds vocab for rows without one, `top_p` 1.0, `min_p` 0.0; temperatures are > 0. As in vLLM, top-p
    applies to the distribution renormalised over the top k; min-p (a ratio to the top probability, which
    renormalising does not change) then applies to what is left, as this sampler always did. A threshold in
    logit space lets the caller apply all three to the unsorted logits with one mask; tokens tied with the last
    kept one stay in. The sort runs only when some row has a top-p; top-k alone is a topk of the largest k.
    """
    vocab, device = x.shape[-1], x.device
    need_p = any(p < 1.0 for p in top_p)
    need_k = any(k < vocab for k in top_k)
    thr = row_max = None
    if need_p:
        sorted_x = x.sort(dim=-1, descending=True).values
        t_p = to_device(
            [[t, p if p < 1.0 else float("inf")] for t, p in zip(temperature, top_p)], torch.float32, device
        )
        k_last = to_device([[k - 1] for k in top_k], torch.int64, device)
        probs = torch.softmax(sorted_x / t_p[:, :1], dim=-1)
        cum = probs.cumsum(dim=-1)
        mass_k = cum.gather(1, k_last)  # top-p is measured against the top-k mass
        before = cum.sub_(probs)  # the mass ranked above each token; the token crossing p stays in
        keep = (before < t_p[:, 1:] * mass_k).sum(dim=-1, keepdim=True)
        thr = sorted_x.gather(1, torch.minimum(keep - 1, k_last).clamp_(min=0))  # NaN rows keep one token
        row_max = sorted_x[:, :1]
    elif need_k:
        largest = max(k for k in top_k if k < vocab)
        top = F.pad(x.topk(largest, dim=-1).values, (0, 1), value=NEG_INF)  # column `largest` keeps all
        thr = top.gather(1, to_device([[k - 1 if k < vocab else largest] for k in top_k], torch.int64, device))
    if any(m > 0.0 for m in min_p):
        # p_i >= min_p * p_max  <=>  x_i >= x_max + T * log(min_p)
        offset = to_device(
            [[t * math.log(m) if m > 0.0 else NEG_INF] for t, m in zip(temperature, min_p)], torch.float32, device
        )
        row_max = x.amax(dim=-1, keepdim=True) if row_max is None else row_max
        thr = row_max + offset if thr is None else torch.maximum(thr, row_max + offset)
    return thr


def log_exponential_(out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill `out` with log(E), E ~ Exp(1), in place. On a GPU that is one exponential_ kernel (its draws are
    never 0). On the CPU E = -log(U) from uniform_, because torch's CPU exponential_ is a serial double-precision
    loop 4-8x slower; U < 1 keeps E > 0 there too, so log(E) is never -inf."""
    if out.device.type == "cpu":
        return out.uniform_(generator=generator).log_().neg_().log_()
    return out.exponential_(generator=generator).log_()


def race(
    x: torch.Tensor, neg_temperature: torch.Tensor, log_noise: torch.Tensor, thr: torch.Tensor | None
) -> torch.Tensor:
    """One draw per row from softmax(x / T) restricted to x >= thr: argmax(p_i / E_i) (the exponential race,
    the same as Gumbel-max), computed as argmax(x - T * log E_i) so that it needs no softmax and no sync.
    Overwrites `log_noise`."""
    z = torch.addcmul(x, log_noise, neg_temperature, out=log_noise)
    if thr is not None:
        z.masked_fill_(x < thr, NEG_INF)
    return argmax(z)


def logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob of each row's token [B], top-k logprobs [B, k], their ids [B, k]) of the raw distribution,
    from a logsumexp, so no [B, V] log_softmax is materialised."""
    lse = torch.logsumexp(raw, dim=-1, keepdim=True)
    chosen = (raw.gather(1, tokens.unsqueeze(1)) - lse).squeeze(1)
    values, ids = raw.topk(k, dim=-1)
    return chosen, values - lse, ids


def _padded(lists: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(x) for x in lists), default=0) or 1
    return [x + [pad] * (width - len(x)) for x in lists]

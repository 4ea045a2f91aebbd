"""The sampler draws from the distribution each option defines: chi-square goodness of fit on a vocabulary of 8.

One row repeated N times is sampled in a single batched call, and the token counts are tested against
probabilities computed here, in float64 Python, straight from the definitions (softmax at temperature T,
renormalised over the kept set). The default generator is seeded, so each test is deterministic; a correct
sampler passes with p > 1e-3, and a wrong kept set or temperature fails by many orders of magnitude.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kiln.runtime.sampler import Sampler
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.sequence import Request

LOGITS = [2.0, 1.5, 1.0, 0.6, 0.2, -0.3, -1.0, -2.0]
N = 20_000


def chi2_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df / 2, stat / 2)."""
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def softmax(logits: list[float], temperature: float) -> list[float]:
    top = max(logits)
    weights = [math.exp((x - top) / temperature) for x in logits]
    return [w / sum(weights) for w in weights]


def renormalised(probs: list[float], keep: set[int]) -> list[float]:
    mass = sum(probs[i] for i in keep)
    return [p / mass if i in keep else 0.0 for i, p in enumerate(probs)]


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The most likely tokens until their mass reaches top_p, the one crossing it included."""
    keep, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        keep.add(i)
        mass += probs[i]
    return keep


def draw_counts(params: SamplingParams, n: int = N, seeded: bool = False) -> list[int]:
    """Token counts of n draws from LOGITS, in one sample() call; seeded rows get seeds 0..n-1."""
    if seeded:
        seqs = [
            Request(f"r{i}", None, [1, 2, 3], SamplingParams(**{**vars_of(params), "seed": i}), 0.0).seqs[0]
            for i in range(n)
        ]
    else:
        seqs = [Request("r", None, [1, 2, 3], params, 0.0).seqs[0]] * n  # rows are independent draws
    logits = torch.tensor([LOGITS]).repeat(n, 1)
    tokens = Sampler([]).sample(logits, seqs).token_ids
    return torch.bincount(tokens, minlength=len(LOGITS)).tolist()


def vars_of(params: SamplingParams) -> dict:
    return {k: v for k, v in vars(params).items() if not k.startswith("_")}


def assert_fits(counts: list[int], expected: list[float]) -> None:
    """Chi-square over the tokens with non-zero probability; the others must never be drawn."""
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0.0), (counts, expected)
    kept = [(c, n * p) for c, p in zip(counts, expected) if p > 0.0]
    stat = sum((c - e) ** 2 / e for c, e in kept)
    p_value = chi2_sf(stat, len(kept) - 1) if len(kept) > 1 else 1.0
    assert p_value > 1e-3, (counts, [round(e) for _, e in kept], stat, p_value)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)


def test_chi2_sf_matches_tables() -> None:
    assert math.isclose(chi2_sf(3.841, 1), 0.05, rel_tol=1e-3)
    assert math.isclose(chi2_sf(9.488, 4), 0.05, rel_tol=1e-3)
    assert math.isclose(chi2_sf(24.322, 7), 0.001, rel_tol=1e-3)


def test_temperature_follows_the_tempered_softmax() -> None:
    assert_fits(draw_counts(SamplingParams(temperature=0.7)), softmax(LOGITS, 0.7))
    assert_fits(draw_counts(SamplingParams(temperature=1.0)), softmax(LOGITS, 1.0))


def test_top_k_keeps_the_k_most_likely() -> None:
    probs = softmax(LOGITS, 1.3)
    assert_fits(draw_counts(SamplingParams(temperature=1.3, top_k=3)), renormalised(probs, {0, 1, 2}))


def test_top_p_keeps_the_nucleus() -> None:
    probs = softmax(LOGITS, 0.9)
    keep = nucleus(probs, 0.7)
    assert keep == {0, 1, 2}
    assert_fits(draw_counts(SamplingParams(temperature=0.9, top_p=0.7)), renormalised(probs, keep))


def test_top_p_applies_to_the_top_k_distribution() -> None:
    """vLLM order: the nucleus of the top-k distribution renormalised (3 tokens here; 4 on the full one)."""
    probs = softmax(LOGITS, 1.0)
    top4 = renormalised(probs, {0, 1, 2, 3})
    keep = nucleus(top4, 0.8)
    assert keep == {0, 1, 2} and nucleus(probs, 0.8) == {0, 1, 2, 3}
    assert_fits(draw_counts(SamplingParams(top_k=4, top_p=0.8)), renormalised(probs, keep))


@pytest.mark.parametrize("temperature, min_p, keep", [(1.0, 0.12, 5), (0.7, 0.1, 4)])
def test_min_p_keeps_tokens_near_the_top(temperature: float, min_p: float, keep: int) -> None:
    probs = softmax(LOGITS, temperature)
    kept = {i for i, p in enumerate(probs) if p >= min_p * max(probs)}
    assert kept == set(range(keep))
    assert_fits(draw_counts(SamplingParams(temperature=temperature, min_p=min_p)), renormalised(probs, kept))


def test_seeded_rows_follow_the_distribution() -> None:
    """Each seeded row draws from its own generator; across seeds the draws still follow the nucleus."""
    probs = softmax(LOGITS, 1.0)
    counts = draw_counts(SamplingParams(top_p=0.9), n=4000, seeded=True)
    assert_fits(counts, renormalised(probs, nucleus(probs, 0.9)))


def test_penalised_sampling_follows_the_penalised_softmax() -> None:
    """Repetition over prompt + output tokens, then frequency and presence over the output tokens."""
    params = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3)
    seq = Request("r", None, [1, 5], params, 0.0).seqs[0]
    seq.token_ids.extend([0, 0, 6])  # outputs: token 0 twice, token 6 once
    penalised = list(LOGITS)
    for t in (0, 1, 5, 6):
        penalised[t] = penalised[t] / 1.5 if penalised[t] > 0 else penalised[t] * 1.5
    for t, count in ((0, 2), (6, 1)):
        penalised[t] -= 0.4 * count + 0.3
    tokens = Sampler([]).sample(torch.tensor([LOGITS]).repeat(N, 1), [seq] * N).token_ids
    assert_fits(torch.bincount(tokens, minlength=len(LOGITS)).tolist(), softmax(penalised, 1.0))


def test_filtered_tokens_never_appear() -> None:
    """A 64-token vocabulary with random logits: every draw lies in the set its filters keep."""
    rng = random.Random(0)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)).tolist()
    options = [
        dict(top_k=5),
        dict(top_p=0.5),
        dict(min_p=0.3),
        dict(top_k=10, top_p=0.6, min_p=0.2),
        dict(temperature=2.5, top_k=2),
        dict(temperature=0.3, top_p=0.95),
    ]
    params = [SamplingParams(**rng.choice(options)) for _ in range(3000)]
    seqs = [Request("r", None, [1], p, 0.0).seqs[0] for p in params]
    tokens = Sampler([]).sample(torch.tensor([logits]).repeat(len(seqs), 1), seqs).token_ids.tolist()
    order = sorted(range(64), key=lambda i: -logits[i])
    for p, token in zip(params, tokens):
        probs = softmax(logits, p.temperature)
        keep = set(order[: p.top_k]) if p.top_k > 0 else set(range(64))
        keep &= nucleus(renormalised(probs, keep), p.top_p)
        keep &= {i for i, q in enumerate(probs) if q >= p.min_p * max(probs)}
        assert token in keep, (p, token, sorted(keep))

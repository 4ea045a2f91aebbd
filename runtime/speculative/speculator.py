"""What the engine asks of speculation: proposals for the running decodes before each schedule, and the
acceptance counts after each step (statistics, and the back-off of sequences whose proposals all fail).

Speculation runs synchronously: proposing needs every accepted token on the host, so a step after one with
speculative sequences waits for that step's tokens (the engine's `_needs_tokens`) instead of running ahead.

Eligible sequences: no penalties, no logit_bias, no grammar and no logprobs (verification reads the model's
own distribution; the others would need per-position bookkeeping of the proposed tokens), and at least
min_tokens outputs (so no stop token is held back at any verified position). A sequence whose last proposal
was wholly rejected stops proposing for 1, 4, 16 ... up to MAX_BACKOFF steps, then proposes one token until one
is accepted, so that a workload the proposer cannot predict costs about what decoding without speculation
costs.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..sequence import Sequence, SequenceStatus
from .config import SpeculativeConfig

MAX_BACKOFF = 64
BACKOFF_GROWTH = 4


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]: ...

    def release(self, seq: Sequence) -> None: ...


def eligible(seq: Sequence) -> bool:
    """Whether seq's sampling allows verifying several positions in one step (see the module docstring)."""
    p = seq.params
    return (
        not p.has_penalties
        and not p.logit_bias
        and p.logprobs is None
        and seq.grammar is None
        and seq.num_output_tokens >= p.min_tokens
    )


class Speculator:
    """Owns the proposer and the acceptance statistics."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config, self.proposer = config, proposer
        self.num_drafts = 0  # verifications with at least one proposed token
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def propose(self, running: list[Sequence]) -> None:
        """Set `seq.draft` for the running sequences about to decode; the scheduler takes what fits its budget."""
        k = self.config.num_speculative_tokens
        asked: list[Sequence] = []
        limits: list[int] = []
        for seq in running:
            seq.draft = []
            if seq.status is not SequenceStatus.RUNNING or seq.num_pending:
                continue
            if seq.num_tokens - seq.num_computed_tokens != 1 or not eligible(seq):
                continue
            if seq.spec_skip:
                seq.spec_skip -= 1
                continue
            # One token after a wholly rejected proposal (a cheap verification), else k; past max_tokens is waste.
            limit = min(1 if seq.spec_backoff else k, seq.params.max_tokens - seq.num_output_tokens - 1)
            if limit > 0:
                asked.append(seq)
                limits.append(limit)
        if asked:
            for seq, draft in zip(asked, self.proposer.propose(asked, limits)):
                seq.draft = draft

    def observe(self, drafts: dict[int, list[int]], seqs: list[Sequence], accepted: dict[int, int]) -> None:
        """Record one step's verifications: drafts by position in the step, accepted counts by the same key."""
        for i, draft in drafts.items():
            n = accepted.get(i, 0)
            self.num_drafts += 1
            self.num_draft_tokens += len(draft)
            self.num_accepted_tokens += n
            seq = seqs[i]
            if n:
                seq.spec_backoff = 0
            else:
                seq.spec_backoff = min(BACKOFF_GROWTH * seq.spec_backoff or 1, MAX_BACKOFF)
                seq.spec_skip = seq.spec_backoff

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)

    def stats(self) -> dict[str, Any]:
        drafts, proposed, accepted = self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        return {
            "spec_num_drafts": drafts,
            "spec_draft_tokens": proposed,
            "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / proposed if proposed else 0.0,
            "spec_mean_accepted_length": 1.0 + accepted / drafts if drafts else 0.0,
        }

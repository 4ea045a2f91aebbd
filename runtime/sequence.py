"""Request and sequence state shared by the scheduler, block manager, sampler and detokenizer.

A request owns n sequences (one per completion). A sequence's KV state is `num_computed_tokens` tokens of
`token_ids` written into the blocks of `block_table`; a preempted sequence drops its blocks and recomputes
its whole token list later, so its outputs never change.

A token being sampled on the device is already in `token_ids` as a placeholder: the negative number
-(1 + its row in that step's samples). The scheduler appends it when it schedules the step, so the next step
can be scheduled (and, with async scheduling, launched, its input taken from the device) before the token is
known on the host; `Scheduler.postprocess` puts the real token in its place. `num_pending` counts them; they
are always the last entries.
"""

from __future__ import annotations

import enum
import itertools
import sys
from typing import TYPE_CHECKING

import torch

from .outputs import RequestMetrics
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .grammar import GrammarState

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion in flight: its tokens, how many are in the KV cache, and where they live."""

    def __init__(self, request: Request, index: int, prompt_token_ids: list[int]) -> None:
        self.seq_id = next(_seq_counter)
        self.request = request
        self.index = index
        self.params = request.params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0  # trailing placeholders: tokens sampled on the device, not yet on the host
        self.status = SequenceStatus.WAITING
        self.stop_ids: frozenset[int] = frozenset()  # tokens that end it: stop_token_ids, and EOS unless ignored
        self.admission_rank = index  # the scheduler admits lower ranks first (-1 once preempted)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hash chain of the full blocks of token_ids seen so far
        self.num_committed_blocks = 0  # leading blocks already published to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        # The sampler takes the plain argmax of the raw logits (greedy; no penalties, no logprobs; no token
        # held back by min_tokens) once token_ids (placeholder included) is this long; never if not greedy.
        p = self.params
        plain = p.greedy and p.logprobs is None and not p.has_penalties and not p.logit_bias
        self.argmax_from = self.num_prompt_tokens + p.min_tokens + 1 if plain else sys.maxsize
        # Speculative decoding (speculative/): the tokens proposed for its next step, and its back-off.
        self.draft: list[int] = []
        self.spec_skip = 0  # steps left without proposals
        self.spec_backoff = 0  # the length of the last back-off
        # The sampler's private RNG for a seeded sequence, made on the logits' device at its first draw.
        self.generator: torch.Generator | None = None
        self.grammar: GrammarState | None = None  # its structured-output matcher, set by the engine
        # Sampling and detokenization results.
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] | None = [] if self.params.logprobs is not None else None
        self.text = ""
        self.prefix_offset = 0  # detokenizer window into token_ids
        self.read_offset = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The outputs known on the host (placeholders left out)."""
        return self.token_ids[self.num_prompt_tokens : len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending

    def drop_pending(self) -> None:
        """Forget the tokens still being sampled (the sequence finished before they arrive)."""
        if self.num_pending:
            del self.token_ids[len(self.token_ids) - self.num_pending :]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, {self.status.value})"
        )


def make_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """A private RNG per seeded sequence, so its samples do not depend on what else is in the batch; the n
    sequences of one request get different streams. It lives on the device that draws the noise."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index * 0x9E3779B97F4A7C15) % (1 << 64))
    return generator


class Request:
    """A user request: the prompt, its parameters, and its n sequences."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        stream: bool = True,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.stream = stream  # report after every step, or only when finished
        self.cache_salt = cache_salt  # prefix-cache hits only among requests with the same salt
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.error: str | None = None  # why the request failed (a step failed it alone); None if it did not
        # Per prompt position, {token: logprob} of that token and the top-k (None for the first), when asked.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None
        )
        self.seqs = [Sequence(self, i, prompt_token_ids) for i in range(params.n)]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

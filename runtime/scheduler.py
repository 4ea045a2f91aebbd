"""Iteration-level (continuous) batching: which sequences run in the next forward pass, and how many tokens each.

Each step spends a token budget (`max_num_batched_tokens`) over at most `max_num_seqs` running sequences:
running decodes first (so that in-flight requests never stall behind a long prompt), then the rest of any
partially computed prompts, then new requests in arrival order. With chunked prefill a prompt larger than
the remaining budget is split over several steps. When the block pool runs dry, the newest running sequence
is preempted: its blocks are freed and it is recomputed later (prefix caching usually makes that cheap).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from .block_manager import BlockManager
from .sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from .detokenizer import Detokenizer


@dataclass
class SchedulerOutput:
    """One step's work: sequences in packing order with their new-token counts (context = num_computed)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Holds the waiting queue and the running set; never schedules past its budgets."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, eos_token_ids: list[int] | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.eos_token_ids = frozenset(eos_token_ids or ())

    def add_request(self, request: Request) -> None:
        self.waiting.extend(request.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: set[int] = set()
        budget = self.max_num_batched_tokens
        allocate, running, bs = self.block_manager.allocate, SequenceStatus.RUNNING, self.block_manager.block_size
        # Decodes (one new token) before partial prefills; sort is stable, so arrival order holds within each.
        for seq in sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed_tokens > 1):
            if budget == 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if seq.num_computed_tokens + num_new > len(seq.block_table) * bs:  # needs a block (most steps do not)
                while not allocate(seq, num_new):
                    victim = max((s for s in self.running if s.seq_id not in scheduled), key=lambda s: s.seq_id)
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not running:
                    continue
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            scheduled.add(seq.seq_id)
            budget -= num_new
        if not out.preempted:
            self._admit(out, scheduled, budget)
        return out

    def _admit(self, out: SchedulerOutput, scheduled: set[int], budget: int) -> None:
        """Move waiting sequences into the running set, first come first served, while budgets allow."""
        bm = self.block_manager
        admitted: set[int] = set()
        for seq in self.waiting:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            leader = seq.request.seqs[0]
            if self._waits_for_leader(seq, leader):
                continue
            if leader is not seq and leader.status is SequenceStatus.RUNNING:
                bm.share(leader, seq, min(seq.num_prompt_tokens, seq.num_tokens - 1))
            hits = bm.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            remaining = seq.num_tokens - seq.num_computed_tokens - len(hits) * bm.block_size
            if remaining > budget and not self.enable_chunked_prefill:
                bm.free(seq)  # undo any sharing
                break
            num_new = min(remaining, budget)
            if not bm.allocate(seq, num_new, hits):
                bm.free(seq)
                break
            bm.record_query(seq.num_tokens)
            if seq.index == 0 and seq.num_output_tokens == 0 and seq.num_cached_tokens == 0:
                seq.num_cached_tokens = len(hits) * bm.block_size
            seq.status = SequenceStatus.RUNNING
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = time.time()
            self.running.append(seq)
            admitted.add(seq.seq_id)
            self._add(out, scheduled, seq, num_new)
            budget -= num_new
        if admitted:
            self.waiting = [s for s in self.waiting if s.seq_id not in admitted]

    @staticmethod
    def _waits_for_leader(seq: Sequence, leader: Sequence) -> bool:
        """Siblings (n > 1) start once the first sequence has computed the shared prompt, then reuse it."""
        return (seq is not leader and seq.num_output_tokens == 0 and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    @staticmethod
    def _add(out: SchedulerOutput, scheduled: set[int], seq: Sequence, num_new: int) -> None:
        out.seqs.append(seq)
        out.num_new_tokens.append(num_new)
        scheduled.add(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front; it recomputes prompt + outputs when readmitted."""
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    # After the forward ----------------------------------------------------------------------------------

    @staticmethod
    def sampling_rows(out: SchedulerOutput) -> list[int]:
        """Positions in `out` of the sequences whose whole context is computed by this step: they sample."""
        return [i for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens))
                if seq.num_computed_tokens + n == len(seq.token_ids)]

    def advance(self, out: SchedulerOutput) -> None:
        """The step's tokens are in the KV cache: count them and publish the blocks they filled."""
        bs, commit = self.block_manager.block_size, self.block_manager.commit
        for seq, num_new in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens // bs > seq.num_committed_blocks:  # a block filled up
                commit(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int],
                    logprobs: list[tuple[float, dict[int, float]] | None] | None,
                    detokenizer: Detokenizer) -> None:
        """Append each sampled token and finish the sequences it ends, as vLLM decides: a stop token or EOS
        (unless ignore_eos) ends without text, a stop string cuts the text before it, then max_tokens; none
        before min_tokens outputs exist."""
        eos = self.eos_token_ids
        for i, (seq, token) in enumerate(zip(seqs, token_ids)):
            seq.token_ids.append(token)
            if logprobs is not None and logprobs[i] is not None:
                seq.cumulative_logprob += logprobs[i][0]
                seq.logprobs.append(logprobs[i][1])
            p = seq.params
            num_outputs = len(seq.token_ids) - seq.num_prompt_tokens
            can_stop = num_outputs >= p.min_tokens
            if can_stop and p.stop_token_ids and token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif can_stop and not p.ignore_eos and token in eos:
                seq.finish_reason = "stop"
            else:
                stop = detokenizer.update(seq, can_stop)
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
                elif num_outputs >= p.max_tokens:
                    seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

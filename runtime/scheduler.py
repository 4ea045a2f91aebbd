"""Iteration-level (continuous) batching: which sequences run in the next forward pass, and how many tokens each.

Each step spends a token budget (`max_num_batched_tokens`) over at most `max_num_seqs` running sequences:
running decodes first (so that in-flight requests never stall behind a long prompt), then the rest of any
partially computed prompts, then new requests in arrival order. With chunked prefill a prompt larger than
the remaining budget is split over several steps. When the block pool runs dry, the newest running sequence
is preempted: its blocks are freed and it is recomputed later (prefix caching usually makes that cheap).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Request, Sequence, SequenceStatus


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
                 enable_chunked_prefill: bool = True) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.extend(request.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: set[int] = set()
        budget = self.max_num_batched_tokens
        # Decodes (one new token) before partial prefills; sort is stable, so arrival order holds within each.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = max((s for s in self.running if s.seq_id not in scheduled), key=lambda s: s.seq_id)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._add(out, scheduled, seq, num_new)
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

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

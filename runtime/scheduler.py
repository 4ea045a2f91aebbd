"""Iteration-level (continuous) batching: which sequences run in the next forward pass, and how many tokens each.

Each step spends a token budget (`max_num_batched_tokens`) over at most `max_num_seqs` running sequences:
running decodes first (so that in-flight requests never stall behind a long prompt), then the rest of any
partially computed prompts, then waiting sequences. With chunked prefill a prompt larger than the remaining
budget is split over several steps. When the block pool runs dry, the newest running sequence is preempted:
its blocks are freed and it is recomputed later (prefix caching usually makes that cheap).

Fairness: waiting sequences are admitted by rank, then arrival. A request's k-th sequence (n > 1) has rank k
and a preempted sequence rank -1, so a request with many sequences takes its turns interleaved with later
requests instead of all in front of them: a later request's first sequence waits for first sequences only.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from .block_manager import BlockManager
from .sequence import Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from .detokenizer import Detokenizer
    from .sampler import SamplerOutput


_RANK = attrgetter("admission_rank")


@dataclass
class SchedulerOutput:
    """One step's work: sequences in packing order, their new-token counts and where those start (context).

    `sample_rows` are the positions of the sequences whose whole context is in after this step: each samples
    a token, whose placeholder the scheduler appended. `filling` holds the sequences that complete a block,
    to be published to the prefix cache once the step's tokens are known.

    `drafts` maps a sequence's position to the tokens proposed for it (speculative decoding): it runs its last
    token and those, and `num_logits` says that the step needs logits at its last 1 + k positions (every other
    sequence needs one row, its last token's). `scored` holds the prompt chunks whose every position needs
    logits too (prompt logprobs), with `num_logits` set to the chunk's length.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    context: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    filling: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    prompt_done: set[int] = field(default_factory=set)  # seq_ids whose prompt completes in this step
    drafts: dict[int, list[int]] = field(default_factory=dict)
    num_logits: dict[int, int] = field(default_factory=dict)  # position -> logit rows, when more than one
    scored: dict[int, int] = field(default_factory=dict)  # position -> its chunk's first position, prompt logprobs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Holds the waiting queue and the running set; never schedules past its budgets."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        eos_token_ids: list[int] | None = None,
    ) -> None:
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
        p = request.params
        stop_ids = frozenset(p.stop_token_ids or ()) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        for seq in request.seqs:  # after every waiting sequence of lower or equal rank
            seq.stop_ids = stop_ids
            self.waiting.insert(bisect.bisect_right(self.waiting, seq.admission_rank, key=_RANK), seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """The next step, with its tokens already counted as computed (vLLM V1 style): a step launched on the
        device is as good as done for the next schedule, which is what lets async scheduling run ahead."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        running, take, bs = SequenceStatus.RUNNING, self._take, self.block_manager.block_size
        publish = self.block_manager.enable_prefix_caching
        seqs, num_new_tokens, contexts, rows, filling = (
            out.seqs,
            out.num_new_tokens,
            out.context,
            out.sample_rows,
            out.filling,
        )
        partial: list[Sequence] = []  # running sequences with several prompt tokens left go after the decodes
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            tokens = seq.token_ids
            context = seq.num_computed_tokens
            num_tokens = len(tokens)
            if num_tokens - context > 1:
                partial.append(seq)
                continue
            if seq.num_pending and num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens:
                continue  # its last allowed token is still being sampled: the sequence ends with it
            draft = seq.draft  # proposals to verify (speculative decoding), whatever fits the budget
            if draft:
                seq.draft = []
                draft = draft[: budget - 1]
                num_new = 1 + len(draft)
            else:
                num_new = 1
            end = context + num_new
            if end > len(seq.block_table) * bs and not self._make_room(out, seq, num_new):
                continue
            # _take for a decode, inlined: this runs for every sequence at every step. Every sequence so far
            # samples, so its position k is also its sample row.
            k = len(seqs)
            seq.num_computed_tokens = end
            seqs.append(seq)
            num_new_tokens.append(num_new)
            contexts.append(context)
            tokens.append(~k)  # the placeholder -1 - k
            seq.num_pending += 1
            rows.append(k)
            if draft:
                out.drafts[k] = draft
                out.num_logits[k] = num_new
            if publish and end >= (seq.num_committed_blocks + 1) * bs:
                filling.append(seq)
            if context < seq.num_prompt_tokens:
                out.prompt_done.add(seq.seq_id)
            budget -= num_new
        for seq in partial:
            if budget == 0:
                break
            if seq.status is running:
                num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
                if self._make_room(out, seq, num_new):
                    budget -= take(out, seq, num_new)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _make_room(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> bool:
        """Blocks for num_new more tokens of running seq, preempting the newest unscheduled sequences when the
        pool is dry; False when seq itself had to go."""
        if seq.num_computed_tokens + num_new <= len(seq.block_table) * self.block_manager.block_size:
            return True  # most steps: the last block has room
        scheduled: set[int] | None = None  # built only when the pool is dry: most calls just allocate
        while not self.block_manager.allocate(seq, num_new):
            if scheduled is None:
                scheduled = {s.seq_id for s in out.seqs}
            victim = max((s for s in self.running if s.seq_id not in scheduled), key=lambda s: s.seq_id)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _take(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> int:
        """Put seq in the step: count its tokens as computed, and when its context is then complete append the
        placeholder of the token it samples. Returns num_new (the budget spent)."""
        context = seq.num_computed_tokens
        computed = seq.num_computed_tokens = context + num_new
        out.seqs.append(seq)
        out.num_new_tokens.append(num_new)
        out.context.append(context)
        tokens = seq.token_ids
        if computed == len(tokens):
            tokens.append(-1 - len(out.sample_rows))
            seq.num_pending += 1
            out.sample_rows.append(len(out.seqs) - 1)
        bm = self.block_manager
        if bm.enable_prefix_caching and computed >= (seq.num_committed_blocks + 1) * bm.block_size:
            out.filling.append(seq)
        if context < seq.num_prompt_tokens <= computed:
            out.prompt_done.add(seq.seq_id)
        if context < seq.num_prompt_tokens and seq.index == 0 and seq.request.prompt_logprobs is not None:
            out.num_logits[len(out.seqs) - 1] = num_new
            out.scored[len(out.seqs) - 1] = context
        return num_new

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Move waiting sequences into the running set, first come first served, while budgets allow."""
        bm = self.block_manager
        admitted: set[int] = set()
        for seq in self.waiting:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            leader = seq.request.seqs[0]
            if self._waits_for_leader(seq, leader, out):
                continue
            if leader is not seq and leader.status is SequenceStatus.RUNNING:
                bm.share(leader, seq, min(seq.num_prompt_tokens, seq.num_tokens - 1))
            # A request that asked for prompt logprobs computes its whole prompt: cached blocks have no logits.
            scoring = seq.request.prompt_logprobs is not None
            hits = bm.find_cached_prefix(seq) if seq.num_computed_tokens == 0 and not scoring else []
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
            budget -= self._take(out, seq, num_new)
        if admitted:
            self.waiting = [s for s in self.waiting if s.seq_id not in admitted]

    @staticmethod
    def _waits_for_leader(seq: Sequence, leader: Sequence, out: SchedulerOutput) -> bool:
        """Siblings (n > 1) start once the first sequence has computed the shared prompt in an earlier step,
        then reuse its blocks."""
        return (
            seq is not leader
            and seq.num_output_tokens == 0
            and not leader.is_finished
            and (leader.num_computed_tokens < leader.num_prompt_tokens or leader.seq_id in out.prompt_done)
        )

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front; it recomputes prompt + outputs when readmitted."""
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.draft = []
        seq.status = SequenceStatus.WAITING
        seq.admission_rank = -1
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    # After the forward ----------------------------------------------------------------------------------

    def postprocess(self, out: SchedulerOutput, sampled: SamplerOutput, detokenizer: Detokenizer) -> list[Sequence]:
        """Put each sampled token in its placeholder and finish the sequences it ends, as vLLM decides: a stop
        token or EOS (unless ignore_eos) ends without text, a stop string cuts the text before it, then
        max_tokens; none before min_tokens outputs exist. Then publish the blocks the step filled. Returns the
        sequences that got a token (a sequence finished meanwhile, by an abort or by the step before when
        steps overlap, gets none) or failed: a row the sampler could not sample, or whose text cannot be
        decoded, fails its request alone.

        A verified sequence (speculative decoding) emits its accepted proposals after its token
        (`sampled.extra`), each checked for stops in turn; the KV slots of its rejected proposals are rolled
        back first, so that only accepted tokens' blocks are kept or published."""
        seqs, got, finished = out.seqs, [], SequenceStatus.FINISHED
        logprobs, errors, extra = sampled.logprobs, sampled.errors, sampled.extra
        update = detokenizer.update if detokenizer.tokenizer is not None else None  # no tokenizer: no text
        for i, (row, token) in enumerate(zip(out.sample_rows, sampled.token_ids)):
            seq = seqs[row]
            if seq.status is finished:
                continue
            if errors and i in errors:
                got.append(self._fail(seq, errors[i]))
                continue
            got.append(seq)
            entry = logprobs[i] if logprobs is not None else None
            if extra and i in extra:
                emitted = [token, *extra[i]]
                self._roll_back(seq, len(emitted))
                for token in emitted:
                    if not self._emit(seq, token, entry, update):
                        break
            else:
                self._emit(seq, token, entry, update)
        for seq in out.filling:
            if seq.status is not finished:
                self.block_manager.commit(seq)
        return got

    def _roll_back(self, seq: Sequence, num_emitted: int) -> None:
        """A verified sequence keeps the KV of the tokens before its last emitted one: placeholders for the
        emitted tokens, computed tokens cut back to the accepted ones, blocks past them freed."""
        tokens = seq.token_ids
        seq.num_computed_tokens = len(tokens) - seq.num_pending + num_emitted - 1
        tokens.extend([-1] * (num_emitted - 1))
        seq.num_pending += num_emitted - 1
        self.block_manager.truncate(seq, seq.num_computed_tokens)

    def _emit(self, seq: Sequence, token: int, entry: tuple | None, update: Any) -> bool:
        """Put one token in seq's oldest placeholder; False when seq ended (finished or failed)."""
        tokens = seq.token_ids
        index = len(tokens) - seq.num_pending  # this step's placeholder: the oldest one
        tokens[index] = token
        seq.num_pending -= 1
        if seq.grammar is not None and token not in seq.stop_ids:
            refused = seq.grammar.advance(token)
            if refused is not None:
                self._fail(seq, refused)
                return False
        if seq.logprobs is not None:
            chosen, top = entry or (0.0, {})
            seq.cumulative_logprob += chosen
            seq.logprobs.append(top)
        p = seq.params
        num_outputs = index + 1 - seq.num_prompt_tokens
        if token in seq.stop_ids and num_outputs >= p.min_tokens:  # a stop token names itself; EOS does not
            seq.finish_reason = "stop"
            if p.stop_token_ids and token in p.stop_token_ids:
                seq.stop_reason = token
        else:
            if update is not None:
                try:
                    stop = update(seq, num_outputs >= p.min_tokens)
                except Exception as exc:  # noqa: BLE001 - e.g. a token id the tokenizer cannot decode
                    self._fail(seq, f"detokenizing failed: {type(exc).__name__}: {exc}")
                    return False
                if stop is not None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
            if seq.finish_reason is None and num_outputs >= p.max_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason is None:
            return True
        seq.drop_pending()
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(tokens) - 1)  # none past the last token
        self.block_manager.commit(seq)
        self.finish(seq)
        return False

    def _fail(self, seq: Sequence, error: str) -> Sequence:
        """End seq (and, through the engine, its request) with an error that only its request sees."""
        seq.finish_reason = "abort"
        seq.request.error = error
        self.finish(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is, with any token still being sampled for it."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.drop_pending()
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

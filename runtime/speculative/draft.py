"""Draft-model proposals: a smaller model of the same vocabulary, compiled by kiln, proposes k tokens greedily.

The draft keeps its own paged KV cache (its own block pool and model runner) with a shadow sequence per target
sequence that holds the tokens whose KV it has computed. Before proposing, the shadow is cut back to the
longest prefix it shares with the target's tokens (the accepted ones; a rejected proposal or a preemption
simply shortens it), the missing tokens are fed in one packed step for the whole batch, then k - 1 single-token
steps extend each proposal. Proposals are the draft's argmax, a point mass, which is what verify.py's
rejection sampling assumes. The draft shares the target's tokenizer: a different vocabulary is refused.
"""

from __future__ import annotations

from typing import Any

from .. import sampling_ops as ops
from ..block_manager import BlockManager
from ..model_runner import ModelRunner
from ..sampler import Sampler
from ..scheduler import SchedulerOutput
from ..sequence import Sequence


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftProposer:
    """Owns the draft model's KV cache and a shadow sequence per target sequence it proposed for."""

    def __init__(self, draft: Any, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int) -> None:
        self.model = draft
        self.max_model_len = min(max_model_len, draft.max_model_len)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(
            draft, num_blocks, block_size, max_num_seqs, self.max_model_len, Sampler([]), enforce_eager=False
        )
        self.shadows: dict[int, Sequence] = {}

    @classmethod
    def load(
        cls, model: Any, target: Any, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int
    ) -> DraftProposer:
        """Compile the draft (a checkpoint directory; a compiled model is used as is) like the target, and check
        that it speaks the target's vocabulary."""
        if isinstance(model, str):
            from kiln.compiler.api import compile as kiln_compile

            model = kiln_compile(model, device=target.device, dtype=getattr(target, "dtype", None))
        if int(model.vocab_size) != int(target.vocab_size):
            raise ValueError(
                f"speculative_config.model: the draft's vocabulary ({model.vocab_size} tokens) differs from the "
                f"target's ({target.vocab_size}); a draft must share the target's tokenizer"
            )
        mine, theirs = getattr(model, "tokenizer", None), getattr(target, "tokenizer", None)
        if mine is not None and theirs is not None and mine.get_vocab() != theirs.get_vocab():
            raise ValueError("speculative_config.model: the draft's tokenizer differs from the target's")
        return cls(model, num_blocks, block_size, max_num_seqs, max_model_len)

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        active: list[tuple[int, Sequence]] = []  # (index in seqs, shadow)
        feeds: list[int] = []
        for i, (seq, limit) in enumerate(zip(seqs, limits)):
            if seq.num_tokens + limit > self.max_model_len:
                continue
            shadow = self._shadow(seq)
            num_new = seq.num_tokens - shadow.num_computed_tokens
            if not self.blocks.allocate(shadow, num_new):
                self.release(seq)  # the draft's pool is full: this sequence goes without proposals
                continue
            active.append((i, shadow))
            feeds.append(num_new)
        for step in range(max((limits[i] for i, _ in active), default=0)):
            if step:  # extend by the last proposal; sequences whose limit is reached drop out
                active = [(i, s) for i, s in active if limits[i] > step and self.blocks.allocate(s, 1)]
                feeds = [1] * len(active)
            if not active:
                break
            for i, token in zip([i for i, _ in active], self._step([s for _, s in active], feeds)):
                drafts[i].append(token)
        return drafts

    def _shadow(self, seq: Sequence) -> Sequence:
        """seq's shadow, cut back to the tokens it shares with seq (at least one left to feed)."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = self.shadows[seq.seq_id] = Sequence(seq.request, seq.index, [])
        keep = _common_prefix(shadow.token_ids, seq.token_ids, min(shadow.num_computed_tokens, seq.num_tokens - 1))
        shadow.num_computed_tokens = keep
        self.blocks.truncate(shadow, keep)
        shadow.token_ids = list(seq.token_ids)
        return shadow

    def _step(self, shadows: list[Sequence], feeds: list[int]) -> list[int]:
        """Feed each shadow its last `feeds` tokens; returns the draft's argmax after each, appended to it."""
        out = SchedulerOutput(seqs=shadows, num_new_tokens=feeds, context=[s.num_computed_tokens for s in shadows])
        input_ids, positions, meta = self.runner.prepare(out)
        logits = self.runner.forward(input_ids, positions, meta, self.runner.kv_caches)
        tokens = ops.argmax(logits.float()).tolist()
        for shadow, n, token in zip(shadows, feeds, tokens):
            shadow.num_computed_tokens += n
            shadow.token_ids.append(token)
        return tokens

    def release(self, seq: Sequence) -> None:
        shadow = self.shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.blocks.free(shadow)
            self.runner.release(shadow)

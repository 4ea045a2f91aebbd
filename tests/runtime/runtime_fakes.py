"""A fake compiled model with a real paged KV cache, and a tiny tokenizer, for runtime tests.

FakeModel stores (token id, position) per cache slot and computes each sequence's logits from its whole
context read back through its block table, so a wrong slot, a reused-while-live block or a bad prefix-cache
hit changes the tokens (or trips an assertion) exactly like it would with a real model.
"""

from __future__ import annotations

import bisect

import torch

from kiln.ops.metadata import AttentionMetadata

_PRIME = 1_000_003


def context_hash(tokens: torch.Tensor) -> int:
    weights = torch.arange(tokens.numel(), dtype=torch.int64) * 7919 + 13
    return int(((tokens.long() + 1) * weights).sum() % _PRIME)


def logits_for(tokens: list[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The fake model's next-token logits for a whole context (the reference the engine must reproduce)."""
    h = context_hash(torch.as_tensor(tokens, dtype=torch.int64))
    ids = torch.arange(vocab_size, dtype=torch.float64)
    return (4.0 * torch.sin(ids * (0.37 + (h % 997) * 0.01) + h * 0.001)).float()


def markov_logits(tokens: list[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits that depend on the last token only (a Markov chain): greedy output cycles, so n-gram lookup hits."""
    last = int(torch.as_tensor(tokens)[-1])
    ids = torch.arange(vocab_size, dtype=torch.float64)
    return (3.0 * torch.cos(ids * (1.3 + 0.71 * last) + 0.4 * last)).float()


def reference_greedy(prompt: list[int], max_tokens: int, vocab_size: int, markov: bool = False) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int((markov_logits if markov else logits_for)(tokens, vocab_size).argmax()))
    return tokens[len(prompt) :]


class FakeModel:
    """Implements the CompiledModel serving interface (forward over packed tokens + paged cache)."""

    num_layers = 1
    num_kv_heads = 1
    head_dim = 2
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(
        self,
        vocab_size: int = 64,
        max_model_len: int = 1024,
        eos_token_ids: list[int] | None = None,
        tokenizer: object | None = None,
        markov: bool = False,
    ) -> None:
        self.logits_fn = markov_logits if markov else logits_for
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = list(eos_token_ids or [])
        self.tokenizer = tokenizer
        self.num_forward_tokens = 0

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return block_size * 16

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        return [torch.full((num_blocks, block_size, 2), -1, dtype=torch.int64)]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        cache = kv_caches[0]
        block_size = cache.shape[1]
        flat = cache.view(-1, 2)
        assert input_ids.dtype == torch.int64 and positions.dtype == torch.int64
        assert len(set(meta.slot_mapping.tolist())) == input_ids.numel(), "two tokens share a cache slot"
        flat[meta.slot_mapping, 0] = input_ids
        flat[meta.slot_mapping, 1] = positions
        self.num_forward_tokens += input_ids.numel()
        rows = []
        starts = meta.query_start_loc.tolist()
        for index in meta.logits_indices.tolist():  # one row per logits index, several per sequence maybe
            s = bisect.bisect_right(starts, index) - 1
            length = int(meta.seq_lens[s]) - (starts[s + 1] - 1 - index)
            nblocks = -(-length // block_size)
            ctx = cache[meta.block_tables[s, :nblocks].long()].view(-1, 2)[:length]
            assert torch.equal(ctx[:, 1], torch.arange(length)), "context read back with wrong positions"
            assert int(positions[index]) == length - 1
            rows.append(self.logits_fn(ctx[:, 0], self.vocab_size))
        return torch.stack(rows)


class CharTokenizer:
    """Character-level tokenizer with a few two-character tokens, BOS=1, EOS=0, '<pad>'=2."""

    SPECIALS = ["</s>", "<s>", "<pad>"]

    def __init__(self) -> None:
        pieces = list("abcdefghijklmnopqrstuvwxyz .,!?") + ["th", "he", "in", "er", "an", " t", "ST", "OP"]
        self.pieces = self.SPECIALS + pieces
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.all_special_ids = [0, 1, 2]

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        ids = [1]
        i = 0
        while i < len(text):
            two = text[i : i + 2]
            if two in self.index and len(two) == 2:
                ids.append(self.index[two])
                i += 2
            else:
                ids.append(self.index[text[i]])
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids))


def check_invariants(engine) -> None:
    """Block-pool and scheduler invariants that must hold between any two engine calls."""
    bm = engine.block_manager
    sched = engine.scheduler
    holders = [0] * bm.num_blocks
    for seq in sched.running:
        assert len(seq.block_table) == -(-seq.num_computed_tokens // bm.block_size), "blocks != computed"
        assert len(set(seq.block_table)) == len(seq.block_table), "a sequence holds a block twice"
        for block in seq.block_table:
            holders[block] += 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0, "a waiting sequence holds blocks"
    assert holders == bm.ref_counts, "reference counts disagree with block tables"
    for seq in sched.running:  # a shared block must be full and computed: nobody may write into it again
        for i, block in enumerate(seq.block_table):
            if holders[block] > 1:
                assert (i + 1) * bm.block_size <= seq.num_computed_tokens, "a shared block is still written"
    free_plain, free_cached = list(bm._free_plain), list(bm._free_cached)
    free = free_plain + free_cached
    assert len(free) == len(set(free)), "a block is free twice"
    for block in range(bm.num_blocks):
        assert (bm.ref_counts[block] == 0) == (block in set(free)), f"block {block} is both used and free"
    for block in free_cached:
        assert bm.block_hash[block] is not None
    for block in free_plain:
        assert bm.block_hash[block] is None
    for block_hash, block in bm.cached.items():
        assert bm.block_hash[block] == block_hash
    assert sum(h is not None for h in bm.block_hash) == len(bm.cached)
    assert len(sched.running) <= sched.max_num_seqs
    live = {s.seq_id for s in sched.running} | {s.seq_id for s in sched.waiting}
    assert len(live) == len(sched.running) + len(sched.waiting), "a sequence is queued twice"
    for request in engine.requests.values():
        for seq in request.seqs:
            assert seq.is_finished or seq.seq_id in live

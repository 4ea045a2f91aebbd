"""The KV block pool: allocation, reference counts and automatic prefix caching.

A block holds `block_size` consecutive tokens of one or more sequences. Once a block is full and computed, it
is keyed by a SHA-256 hash chain (parent block's hash + its token ids), so a later sequence with the same
prefix reuses it instead of recomputing. When its last owner lets go, a hashed block stays cached while it
sits in the free pool; it is evicted (least recently freed first) only when no never-cached block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence

_ROOT_HASH = b"kiln-prefix-root"


def cache_root(cache_salt: str | None) -> bytes:
    """The first parent of a request's hash chain: requests with different salts never share a cached block,
    so one tenant cannot learn, from cache hits, what another's prompts begin with."""
    if cache_salt is None:
        return _ROOT_HASH
    return hashlib.sha256(_ROOT_HASH + b"salt:" + cache_salt.encode("utf-8")).digest()


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Content key of a full block: stable across processes (unlike Python's `hash`) and collision-safe."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Owns every block id in [0, num_blocks); sequences hold them through their block tables."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id holding that content
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # hashed free blocks, LRU first
        self.prefix_cache_hit_tokens = 0
        self.prefix_cache_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # Prefix cache lookup -------------------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids already holding seq's leading full blocks; always leaves >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(seq, seq.num_tokens)
        usable = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in seq.block_hashes[:usable]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _extend_hashes(self, seq: Sequence, upto: int) -> None:
        """Hash seq's full blocks among its first `upto` tokens (each block hashed once per sequence)."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), upto // bs):
            parent = hashes[-1] if hashes else cache_root(seq.request.cache_salt)
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    # Allocation ----------------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | tuple[int, ...] = ()) -> bool:
        need = (
            self.blocks_needed(seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens)
            - len(seq.block_table)
            - len(cached_blocks)
        )
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return max(need, 0) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] | tuple[int, ...] = ()) -> bool:
        """Take the cached prefix blocks (first admission) and enough fresh blocks for num_new_tokens more.

        Returns False, changing nothing, when the pool cannot supply them.
        """
        if not self.can_allocate(seq, num_new_tokens, cached_blocks):
            return False
        if cached_blocks:
            for block in cached_blocks:
                self._acquire(block)
            seq.block_table.extend(cached_blocks)
            hit = len(cached_blocks) * self.block_size
            seq.num_computed_tokens += hit
            self.prefix_cache_hit_tokens += hit
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free_block())
        return True

    def share(self, src: Sequence, dst: Sequence, num_tokens: int) -> None:
        """Let dst (a sibling, n > 1) reuse src's first num_tokens // block_size computed full blocks."""
        count = min(num_tokens, src.num_computed_tokens) // self.block_size
        for block in src.block_table[:count]:
            self._acquire(block)
        dst.block_table.extend(src.block_table[:count])
        dst.num_computed_tokens = count * self.block_size

    def record_query(self, num_tokens: int) -> None:
        self.prefix_cache_query_tokens += num_tokens

    def _acquire(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._free_cached.pop(block)
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        if self._free_plain:
            block = self._free_plain.pop()
        else:
            block, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            block_hash = self.block_hash[block]
            assert block_hash is not None  # _free_cached holds hashed blocks only
            del self.cached[block_hash]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    # Bookkeeping after a step and release --------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Publish seq's newly completed full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_committed_blocks:
            return
        self._extend_hashes(seq, full * self.block_size)
        for i in range(seq.num_committed_blocks, full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            block_hash = seq.block_hashes[i]
            if block_hash not in self.cached:  # a duplicate of a cached block stays private
                self.cached[block_hash] = block
                self.block_hash[block] = block_hash
        seq.num_committed_blocks = full

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back seq's blocks past its first num_tokens tokens (the slots of rejected speculative tokens).
        The table becomes a new list, which tells the model runner to rewrite the sequence's row."""
        keep = self.blocks_needed(num_tokens)
        if keep >= len(seq.block_table):
            return
        self._release(seq.block_table[keep:])
        seq.block_table = seq.block_table[:keep]

    def _release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self._free_cached[block] = None
                else:
                    self._free_plain.append(block)

    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks; tail blocks go back first so that they are evicted first."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

"""N-gram (prompt lookup) proposals: the tokens that followed an earlier occurrence of the context's last n.

Text that edits or quotes its prompt, code that repeats identifiers, or a model that has fallen into a cycle
continues with tokens it has already seen; looking them up costs a vectorised scan of the context and no model.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..sequence import Sequence


def ngram_lookup(tokens: np.ndarray, low: int, high: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens, for the longest n in
    [low, high] that matches; the latest match with k followers is preferred. [] when nothing matches."""
    length = len(tokens)
    for n in range(min(high, length - 1), low - 1, -1):
        pattern = tokens[length - n :]
        windows = sliding_window_view(tokens[: length - 1], n)  # starts 0 .. length-1-n: never the pattern itself
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= length]
            start = int(full[-1] if full.size else hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    """Proposes from each sequence's own tokens (prompt and outputs); stateless."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.low, self.high = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        return [
            ngram_lookup(np.asarray(seq.token_ids, dtype=np.int64), self.low, self.high, k)
            for seq, k in zip(seqs, limits)
        ]

    def release(self, seq: Sequence) -> None:
        """Nothing is held per sequence."""

"""Incremental detokenization and stop conditions.

Text grows by decoding a small sliding window of tokens (vLLM's prefix/read offsets) instead of the whole
output every step, and only once the window decodes to complete characters (no trailing U+FFFD from a
partial multi-byte sequence). Stop checks follow vLLM: EOS (unless ignore_eos) and stop_token_ids end the
sequence without adding their text; a stop string truncates the text just before it; none of these fire
before min_tokens tokens exist; max_tokens ends it with finish_reason 'length'.
"""
from __future__ import annotations

from typing import Any

from .sequence import Sequence

# Prompt tokens kept as left context so that the first output token decodes with its leading space.
_INITIAL_CONTEXT = 5


class Detokenizer:
    """Appends sampled tokens to sequences, updates their text, and decides when they finish."""

    def __init__(self, tokenizer: Any | None, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)

    def start(self, seq: Sequence) -> None:
        seq.prefix_offset = max(seq.num_prompt_tokens - _INITIAL_CONTEXT, 0)
        seq.read_offset = seq.num_prompt_tokens

    def append(self, seq: Sequence, token_id: int) -> None:
        """Add one sampled token; sets seq.finish_reason / stop_reason when it ends the sequence."""
        seq.token_ids.append(token_id)
        p = seq.params
        can_stop = seq.num_output_tokens >= p.min_tokens
        if can_stop and p.stop_token_ids and token_id in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
            return
        if can_stop and not p.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason = "stop"
            return
        if self.tokenizer is not None:
            new_text = self._decode_new(seq)
            if new_text:
                start = len(seq.text)
                seq.text += new_text
                if can_stop and p.stop_strings and self._check_stop_strings(seq, start):
                    return
        if seq.num_output_tokens >= p.max_tokens:
            seq.finish_reason = "length"

    def visible_text(self, seq: Sequence) -> str:
        """Text safe to show while running: hold back a tail that might still grow into a stop string."""
        if seq.finish_reason is not None or not seq.params.stop_strings:
            return seq.text
        hold = max(len(s) for s in seq.params.stop_strings) - 1
        return seq.text[:len(seq.text) - hold] if hold else seq.text

    def _decode_new(self, seq: Sequence) -> str:
        skip = seq.params.skip_special_tokens
        tokens = seq.token_ids
        prefix_text = self.tokenizer.decode(tokens[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full_text = self.tokenizer.decode(tokens[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible) so far: wait for more tokens
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(tokens)
        return full_text[len(prefix_text):]

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_start: int) -> bool:
        """Find the earliest stop string that overlaps the new text; cut the text just before it."""
        best = -1
        best_stop = None
        for stop in seq.params.stop_strings:
            idx = seq.text.find(stop, max(new_start - len(stop) + 1, 0))
            if idx != -1 and (best == -1 or idx < best):
                best, best_stop = idx, stop
        if best == -1:
            return False
        seq.text = seq.text[:best]
        seq.finish_reason, seq.stop_reason = "stop", best_stop
        return True

"""Incremental detokenization and stop strings.

Text grows by decoding a small sliding window of tokens (vLLM's prefix/read offsets) instead of the whole
output every step, and only once the window decodes to complete characters (no trailing U+FFFD from a
partial multi-byte sequence). A stop string truncates the text just before it. Which stop ends a sequence
(token, EOS, stop string, length) is decided in `Scheduler.postprocess`.
"""

from __future__ import annotations

from typing import Any

from .sequence import Sequence

# Prompt tokens kept as left context so that the first output token decodes with its leading space.
_INITIAL_CONTEXT = 5


class Detokenizer:
    """Keeps sequences' text in step with their tokens and finds stop strings; finishing is the scheduler's."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer

    def start(self, seq: Sequence) -> None:
        seq.prefix_offset = max(seq.num_prompt_tokens - _INITIAL_CONTEXT, 0)
        seq.read_offset = seq.num_prompt_tokens

    def update(self, seq: Sequence, can_stop: bool) -> str | None:
        """Decode the text of seq's newest token; when it completes a stop string (and `can_stop`), cut the
        text just before it and return that stop string."""
        if self.tokenizer is None:
            return None
        new_text = self._decode_new(seq)
        if not new_text:
            return None
        start = len(seq.text)
        seq.text += new_text
        if can_stop and seq.params.stop_strings:
            return self._find_stop_string(seq, start)
        return None

    def visible_text(self, seq: Sequence) -> str:
        """Text safe to show while running: hold back a tail that might still grow into a stop string."""
        if seq.finish_reason is not None or not seq.params.stop_strings:
            return seq.text
        hold = max(len(s) for s in seq.params.stop_strings) - 1
        return seq.text[: len(seq.text) - hold] if hold else seq.text

    def _decode_new(self, seq: Sequence) -> str:
        assert self.tokenizer is not None
        skip = seq.params.skip_special_tokens
        tokens, end = seq.token_ids, len(seq.token_ids) - seq.num_pending
        prefix_text = self.tokenizer.decode(tokens[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
        full_text = self.tokenizer.decode(tokens[seq.prefix_offset : end], skip_special_tokens=skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing visible) so far: wait for more tokens
        seq.prefix_offset = seq.read_offset
        seq.read_offset = end
        return full_text[len(prefix_text) :]

    @staticmethod
    def _find_stop_string(seq: Sequence, new_start: int) -> str | None:
        """The earliest stop string that overlaps the new text; the text is cut just before it."""
        best = -1
        best_stop = None
        for stop in seq.params.stop_strings:
            idx = seq.text.find(stop, max(new_start - len(stop) + 1, 0))
            if idx != -1 and (best == -1 or idx < best):
                best, best_stop = idx, stop
        if best_stop is not None:
            seq.text = seq.text[:best]
        return best_stop

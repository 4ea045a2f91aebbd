"""Grammar-constrained decoding with llguidance: compiled grammars (LRU cache), per-sequence matchers, and the
batch token bitmask that the sampler applies to the logits.

Why llguidance rather than xgrammar (vLLM's default): it is one self-contained wheel with no torch or TVM
dependency, so it installs where torch is pinned and travels to machines without a package registry; it
computes the masks of a whole batch on its own threads with the GIL released, and needs no ahead-of-time
per-vocabulary compilation beyond its tokenizer (built once per engine, ~1 s).

Flow: `GrammarCompiler.matcher` compiles a `StructuredOutput` once (then copies the cached initial matcher);
`start_masks` begins filling a step's bitmask on llguidance's threads before the forward is queued (on a CPU
it unpacks it to one bool per token there too; a step with one or two constrained rows does it inline), so the
host work overlaps the model; `MaskJob.apply` waits for
it and masks every constrained row of the logits at once (rows without a grammar get an all-ones mask, so
their values are untouched). `Scheduler.postprocess` advances each matcher with its committed token
(`GrammarState.advance`); a rejected token fails that request. EOS is allowed by the mask only when the
grammar accepts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .structured_output import StructuredOutput

CACHE_SIZE = 256
INLINE_ROWS = 2  # steps with at most this many constrained rows fill their masks on the calling thread
_BYTE_BITS: dict[torch.device, torch.Tensor] = {}  # per device: [256, 8] bool, whether byte x has bit b


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> str | None:
        """Consume a committed token; an error message when the grammar refuses it (None when accepted)."""
        if self.matcher.consume_token(token):
            return None
        return f"structured output: the grammar refused token {token}: {self.matcher.get_error() or 'not allowed'}"


def _grammar_text(llg: Any, spec: StructuredOutput) -> str:
    """llguidance's grammar for a spec: compact JSON (no free whitespace, which a model could repeat forever)."""
    schema = spec.json_schema()
    if schema is not None:
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    if spec.regex is not None:
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        import json

        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    assert spec.grammar is not None
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(spec.grammar)  # GBNF (llama.cpp's, which vLLM's xgrammar also reads) becomes Lark
    except Exception as err:  # the converter's own error type
        raise ValueError(str(err)) from None
    return llg.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """Compiles specs for one tokenizer and vocabulary; the compiled initial matchers are kept (LRU)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], cache_size: int = CACHE_SIZE) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, list(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._llt: Any = None
        self._executor: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self.num_compiled = 0

    def _tokenizer(self) -> Any:
        with self._build_lock:  # built once, on first use (about 1 s for a real vocabulary)
            if self._llt is None:
                self._build_tokenizer()
        return self._llt

    def _build_tokenizer(self) -> None:
        try:
            import llguidance.hf
        except ImportError:
            raise ValueError("structured_output needs the llguidance package (pip install llguidance)") from None
        if self.tokenizer is None:
            raise ValueError("structured_output needs a tokenizer, and this model has none")
        try:
            eos = self.eos_token_ids or None
            self._llt = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        except Exception as err:  # e.g. a slow (Python) tokenizer
            raise ValueError(f"structured_output cannot use this model's tokenizer: {err}") from None
        self._executor = llguidance.LLExecutor()

    def matcher(self, spec: StructuredOutput) -> GrammarState:
        """A fresh matcher for `spec`, compiled on first use; ValueError naming what the engine rejected."""
        import llguidance

        llt = self._tokenizer()
        key = spec.key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            try:
                grammar = _grammar_text(llguidance, spec)
            except ValueError as err:
                raise ValueError(f"structured_output has an invalid {spec.kind}: {err}") from None
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, llt)
            if failed:
                raise ValueError(f"structured_output has an invalid {spec.kind}: {messages[0].strip()}")
            template = llguidance.LLMatcher(llt, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"structured_output has an invalid {spec.kind}: {template.get_error()}")
            with self._lock:
                self._cache[key] = template
                self.num_compiled += 1
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return GrammarState(template.deep_copy())

    def start_masks(self, seqs: list[Any], device: torch.device) -> MaskJob | None:
        """Begin filling the bitmask of a step's sampled rows (row i is the Sequence seqs[i]) on llguidance's
        threads, and on a CPU unpacking it too; None when no row has a grammar."""
        rows = [(s.grammar.matcher, i) for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None
        from llguidance.torch import fill_next_token_bitmask_par

        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(seqs), words), -1, dtype=torch.int32, pin_memory=device.type == "cuda")

        def fill() -> torch.Tensor | None:
            fill_next_token_bitmask_par(self._executor, rows, bitmask)
            return allowed_tokens(bitmask, self.vocab_size, device) if device.type == "cpu" else None

        if len(rows) <= INLINE_ROWS:  # a thread hand-off costs more than a mask or two
            done: Future = Future()
            done.set_result(fill())
            return MaskJob(done, bitmask)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-grammar")
        return MaskJob(self._pool.submit(fill), bitmask)


def allowed_tokens(bitmask: torch.Tensor, vocab: int, device: torch.device, table: bool | None = None) -> torch.Tensor:
    """[B, vocab] bool on `device` from a host [B, W] int32 bitmask (bit j of word w: token 32 w + j). On a CPU
    numpy's C loop unpacks it; elsewhere (or with table=True) each byte expands on the device through a
    [256, 8] table in one gather, so only the packed mask crosses the bus."""
    if not (device.type != "cpu" if table is None else table):
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        return torch.from_numpy(bits).view(torch.bool)
    lookup = _BYTE_BITS.get(device)
    if lookup is None:
        lookup = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1 == 1
        _BYTE_BITS[device] = lookup
    mask = bitmask.to(device, non_blocking=True).view(torch.uint8)  # little-endian: token 8 * byte + bit
    return lookup[mask.long()].view(bitmask.shape[0], -1)[:, :vocab]


class MaskJob:
    """A step's token bitmask being filled on the host: 32 tokens per int32 word, bit set = allowed."""

    def __init__(self, future: Future, bitmask: torch.Tensor) -> None:
        self.future, self.bitmask = future, bitmask

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [B, V] with every disallowed token at -inf (a new tensor), in one batched pass."""
        allowed = self.future.result()  # unpacked already on a CPU
        if allowed is None:
            allowed = allowed_tokens(self.bitmask, logits.shape[-1], logits.device)
        return torch.where(allowed, logits, float("-inf"))

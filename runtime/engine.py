"""`LLMEngine`: the synchronous serving loop over a compiled model (vLLM's `LLMEngine`).

add_request validates everything up front, so a bad request raises there and never disturbs the running
batch; step() schedules, runs one forward pass over the packed batch, samples, detokenizes and reports.

With async scheduling (the default on a GPU) steps overlap: step() schedules and launches step N+1 before it
turns step N's tokens into outputs, so the host's work hides behind the device's. A sequence that step N
finishes was already in step N+1; that token is dropped and its blocks are freed when the finish is reported.
Tokens and finish reasons are the same either way.

With `speculative_config` (speculative/), proposals are made for the running decodes before each schedule and
verified by the target in the step: a step after one with speculative sequences waits for its tokens first,
so speculation runs synchronously (requests that cannot speculate, e.g. penalised ones, do not change that).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from .block_manager import BlockManager
from .detokenizer import Detokenizer
from .grammar import GrammarCompiler
from .kv_memory import GIB, size_kv_pool
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .sampler import DeviceSample, Sampler, SamplerOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Request, Sequence
from .speculative.config import SpeculativeConfig
from .speculative.speculator import Speculator, eligible

logger = logging.getLogger("kiln")


class LLMEngine:
    """Owns the KV cache, the scheduler and the in-flight requests of one compiled model."""

    def __init__(
        self,
        model: Any,
        *,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        gpu_memory_utilization: float = 0.9,
        async_scheduling: bool | None = None,
        speculative_config: dict | SpeculativeConfig | None = None,
    ) -> None:
        """async_scheduling: overlap each step's host work with the previous step on the device; None = on
        when the model is on a GPU (on a CPU the host is the device, so there is nothing to overlap).
        speculative_config: vLLM's dict, {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max":
        4, "prompt_lookup_min": 1} or {"method": "draft_model", "model": DIR, "num_speculative_tokens": k}."""
        spec_config = SpeculativeConfig.from_dict(speculative_config) if speculative_config is not None else None
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.eos_token_ids = list(model.eos_token_ids or [])
        self.vocab_size = int(model.vocab_size)
        self.max_model_len = min(model.max_model_len, max_model_len or model.max_model_len)
        for name, value in (
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.block_size = block_size
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048 if enable_chunked_prefill else max(2048, self.max_model_len)
        if not enable_chunked_prefill and max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled"
            )
        self.kv_pool = size_kv_pool(
            model,
            block_size=block_size,
            max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            num_kv_blocks=num_kv_blocks,
            kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        logger.info(self.kv_pool.describe())
        num_blocks = self.kv_pool.num_blocks
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, self.eos_token_ids
        )
        self.sampler = Sampler(self.eos_token_ids)
        self.runner = ModelRunner(
            model, num_blocks, block_size, max_num_seqs, self.max_model_len, self.sampler, enforce_eager
        )
        self.detokenizer = Detokenizer(self.tokenizer)
        self.grammars = self.runner.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        if async_scheduling is None:
            async_scheduling = self.runner.device.type == "cuda"
        self.async_scheduling = bool(async_scheduling)
        self.speculator = None if spec_config is None else self._speculator(spec_config, num_blocks, max_num_seqs)
        self.in_flight: tuple[SchedulerOutput, DeviceSample | None] | None = None  # launched, not reported
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self.num_generated_tokens = 0

    def _speculator(self, config: SpeculativeConfig, num_blocks: int, max_num_seqs: int) -> Speculator:
        if config.method == "ngram":
            from .speculative.proposer import NgramProposer

            return Speculator(config, NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
        from .speculative.draft import DraftProposer

        draft = DraftProposer.load(
            config.model, self.model, num_blocks, self.block_size, max_num_seqs, self.max_model_len
        )
        return Speculator(config, draft)

    # Requests ------------------------------------------------------------------------------------------

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | dict | None = None,
        arrival_time: float | None = None,
        stream: bool = True,
        cache_salt: str | None = None,
    ) -> Request:
        """Validate and tokenize a request without touching engine state (raises ValueError when bad).

        stream: report the request after every step that gives it tokens; False reports it once, finished
        (what `LLM.generate` needs, and much less host work per step for a large batch).
        cache_salt: prefix-cache hits only among requests with the same salt (vLLM's; one per tenant).
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams or a dict, got {type(params).__name__}")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise ValueError(f"logit_bias keys must be token ids in [0, {self.vocab_size})")
        text, token_ids = self._tokenize(prompt)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none; use stop_token_ids")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        needed = self.block_manager.blocks_needed(total - 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {needed} KV blocks but the pool has only "
                f"{self.block_manager.num_blocks} (raise num_kv_blocks or kv_cache_memory)"
            )
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        spec = params.structure
        grammars = [self.grammars.matcher(spec) for _ in range(params.n)] if spec is not None else None
        request = Request(request_id, text, token_ids, params, arrival_time or time.time(), stream, cache_salt)
        for seq in request.seqs:
            self.detokenizer.start(seq)
            if grammars is not None:
                seq.grammar = grammars[seq.index]
        return request

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; pass token ids instead")
            token_ids = list(self.tokenizer.encode(prompt))
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)):
            token_ids, text = list(prompt), None
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in token_ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        return text, token_ids

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | dict | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.enqueue(self.make_request(request_id, prompt, params, arrival_time))

    def enqueue(self, request: Request) -> None:
        """Admit a request built by make_request."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def abort(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free all their blocks; unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            request = self.requests.pop(rid, None)
            if request is not None:
                self._end(request)
                request.metrics.finished_time = time.time()

    def _end(self, request: Request) -> None:
        """Abort whatever of the request still runs and give back its blocks and rows."""
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.runner.release(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def check_health(self) -> None:
        """Raise when the model can no longer run (a tensor-parallel rank died); nothing otherwise."""
        check = getattr(self.model, "check_health", None)
        if check is not None:
            check()

    # The loop ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; returns the requests that produced tokens (streamed ones) or finished.

        With async scheduling the outputs are those of the step launched by the previous call."""
        outputs: list[RequestOutput] = []
        if self.in_flight is not None and self._needs_tokens(self.in_flight[0]):
            outputs = self._report()  # penalties, grammars and proposals read the previous tokens: no running ahead
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.is_empty and self.in_flight is None and self.scheduler.has_unfinished():
            raise RuntimeError("scheduler made no progress with requests pending")  # spinning would hide a bug
        launched = None
        if not sched.is_empty:
            self.num_steps += 1
            try:
                launched = (sched, self.runner.launch(sched))
            except Exception as exc:  # noqa: BLE001 - the step's requests fail; the engine and the queue go on
                if getattr(exc, "fatal", False):  # the model cannot run again (a dead rank): stop, do not spin
                    raise
                logger.exception("kiln: a forward pass failed; its requests fail, the others go on")
                outputs += self._fail(sched, f"forward pass failed: {type(exc).__name__}: {exc}")
        if self.in_flight is not None:
            outputs += self._report()
        self.in_flight = launched
        if not self.async_scheduling and launched is not None:
            outputs += self._report()
        return outputs

    def _needs_tokens(self, sched: SchedulerOutput) -> bool:
        """Whether the step after `sched` must wait for its tokens on the host (a penalty counts them, a grammar's
        mask for the next token depends on them, a proposer continues them)."""
        spec = self.speculator is not None
        seqs = [sched.seqs[i] for i in sched.sample_rows]
        return any(s.params.has_penalties or s.grammar is not None or (spec and eligible(s)) for s in seqs)

    def _report(self) -> list[RequestOutput]:
        """Wait for the in-flight step's tokens and turn them into sequence state and outputs."""
        assert self.in_flight is not None
        sched, sample = self.in_flight
        self.in_flight = None
        if sample is None:
            self.scheduler.postprocess(sched, SamplerOutput([]), self.detokenizer)
            return []
        host = sample.to_host()
        if sched.drafts and self.speculator is not None:
            accepted = {sched.sample_rows[i]: len(more) for i, more in host.extra.items()}
            self.speculator.observe(sched.drafts, sched.seqs, accepted)
        seqs = self.scheduler.postprocess(sched, host, self.detokenizer)
        self.num_generated_tokens += len(seqs) + sum(len(more) for more in host.extra.values())
        return self._outputs(seqs)

    def _fail(self, sched: SchedulerOutput, error: str) -> list[RequestOutput]:
        """End every request of a step that could not run, with `error`; the requests stay in no queue."""
        for seq in sched.seqs:
            if not seq.is_finished:
                seq.request.error = error
        return self._outputs(sched.seqs)

    def _outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """RequestOutputs for the requests whose sequences just got a token: every streamed one, and the others
        once finished. Finished requests leave the engine here."""
        now = time.time()
        touched: dict[str, Request] = {}
        for seq in seqs:
            request = seq.request
            if request.error is not None:  # a failure of this request alone: it ends whole
                self._end(request)
            elif request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            if seq.finish_reason is not None:
                self._release(seq)
                touched[request.request_id] = request
            elif request.stream:
                touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            finished = request.is_finished
            if finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            if finished or request.stream:
                outputs.append(self._output(request, finished))
        return outputs

    def _output(self, request: Request, finished: bool) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=seq.index,
                text=self.detokenizer.visible_text(seq),
                token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in request.seqs
        ]
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            completions,
            finished,
            request.metrics,
            request.seqs[0].num_cached_tokens,
            request.error,
            request.prompt_logprobs,
        )

    def stats(self) -> dict[str, int | float]:
        bm = self.block_manager
        return {
            "kv_blocks_total": bm.num_blocks,
            "kv_cache_tokens": self.kv_pool.tokens,
            "kv_cache_bytes": self.kv_pool.bytes,
            "kv_cache_gib": round(self.kv_pool.bytes / GIB, 4),
            "kv_blocks_in_use": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "block_size": bm.block_size,
            "prefix_cache_hit_tokens": bm.prefix_cache_hit_tokens,
            "prefix_cache_query_tokens": bm.prefix_cache_query_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_unfinished_requests": len(self.requests),
            "num_steps": self.num_steps,
            "num_generated_tokens": self.num_generated_tokens,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }

"""`LLM`: offline batched generation (vLLM's `LLM`), the one-call way to use a compiled model."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Sequence
from typing import Any

from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

PromptType = str | list[int]


class LLM:
    """Compile a model (a path, a PreTrainedModel, or an already compiled CompiledModel) and serve it.

    Engine options: block_size, num_kv_blocks, kv_cache_memory, gpu_memory_utilization (0.9), max_num_seqs,
    max_num_batched_tokens, enforce_eager, enable_prefix_caching, enable_chunked_prefill, max_model_len,
    async_scheduling (None: overlap steps on a GPU), speculative_config (vLLM's dict; see LLMEngine). Compile
    options: device ("auto": the first CUDA GPU when there is one, else the CPU), backend, dtype, quantization,
    kv_cache_dtype, tensor_parallel_size (see `kiln.compile`; `shutdown` stops its worker processes).
    """

    def __init__(
        self,
        model: Any,
        *,
        device: Any = "auto",
        backend: str = "auto",
        dtype: Any = None,
        max_model_len: int | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str | None = None,
        tensor_parallel_size: int = 1,
        **engine_options: Any,
    ) -> None:
        if _is_compiled(model):
            ranks = getattr(model, "tensor_parallel_size", 1)
            if tensor_parallel_size != ranks:
                raise ValueError(
                    f"tensor_parallel_size: the model given is compiled for {ranks} rank(s), not "
                    f"{tensor_parallel_size}; compile it with the size wanted"
                )
            compiled = model
        else:
            from kiln.compiler.api import compile as kiln_compile

            compiled = kiln_compile(
                model,
                backend=backend,
                dtype=dtype,
                max_model_len=max_model_len,
                quantization=quantization,
                kv_cache_dtype=kv_cache_dtype,
                device=device,
                tensor_parallel_size=tensor_parallel_size,
            )
        self.model = compiled
        self.engine = LLMEngine(compiled, max_model_len=max_model_len, **engine_options)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel model (also done at exit); nothing to do otherwise."""
        stop = getattr(self.model, "shutdown", None)
        if stop is not None:
            stop()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns finished RequestOutputs in input order.

        Every request is validated before any runs, so one bad prompt or parameter raises ValueError and
        generates nothing. The progress line appears on stderr only once a batch has run for 2 seconds.
        """
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        requests = [
            self.engine.make_request(f"llm-{next(self._ids)}", p, sp, stream=False)
            for p, sp in zip(prompt_list, params_list)
        ]
        for request in requests:
            self.engine.enqueue(request)
        pending = {r.request_id for r in requests}
        finished: dict[str, RequestOutput] = {}
        progress = _Progress(len(requests)) if use_tqdm else None
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        finished[out.request_id] = out
                        pending.discard(out.request_id)
                        if progress is not None:
                            progress.update(out)
        except BaseException:
            self.engine.abort(list(pending))
            raise
        finally:
            if progress is not None:
                progress.close()
        return [finished[r.request_id] for r in requests]

    def stats(self) -> dict[str, int | float]:
        """KV pool size (blocks, tokens, GiB) and usage, prefix-cache hits, preemptions and queue sizes."""
        return self.engine.stats()


def _is_compiled(model: Any) -> bool:
    return all(hasattr(model, name) for name in ("forward", "allocate_kv_cache", "kv_cache_bytes_per_block"))


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise ValueError(f"prompts must be a string, a list of token ids, or a list of those; got {type(prompts).__name__}")


class _Progress:
    """A dependency-free progress line on stderr, shown only for batches that take a while."""

    DELAY_S = 2.0

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self.shown = False

    def update(self, out: RequestOutput) -> None:
        self.done += 1
        self.tokens += sum(len(c.token_ids) for c in out.outputs)
        elapsed = time.perf_counter() - self.start
        if elapsed >= self.DELAY_S:
            self.shown = True
            sys.stderr.write(
                f"\rkiln: {self.done}/{self.total} requests, {self.tokens / elapsed:.1f} output tok/s, {elapsed:.1f}s"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()

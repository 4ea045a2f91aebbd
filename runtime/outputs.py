"""What the engine hands back for a request, shaped like vLLM's outputs so that existing user code reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One of a request's n completions. Text and token ids are cumulative (everything generated so far).

    finish_reason: 'stop' (EOS, a stop token or a stop string), 'length' (max_tokens), 'abort', or None while
    running. stop_reason: the stop string or stop token id that ended it, None for EOS or other reasons.
    logprobs: per generated token, {token_id: logprob} of the top-k tokens plus the sampled one (None unless
    requested).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request after an engine step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # Set when a failure of this request alone (its sampling, its text, or the forward pass it was in)
    # ended it; its completions then finish with 'abort'. Other requests are not affected.
    error: str | None = None
    # With SamplingParams.prompt_logprobs: per prompt token, {token_id: logprob} of it and the top-k; the first
    # is None (nothing precedes it), as in vLLM.
    prompt_logprobs: list[dict[int, float] | None] | None = None

"""Request models and response pieces of the OpenAI-compatible API served by `kiln.runtime.server`.

Models are strict and refuse unknown fields, so that a misspelt option is a 400 naming it rather than a
silently ignored setting; every field of OpenAI's own APIs is known. Informational ones (`store`, `metadata`,
`service_tier`, `user`, ...) are accepted and ignored; those asking for what kiln cannot do (audio, web search,
fill-in-the-middle `suffix`, moderation) are refused by name. Values are range-checked by `SamplingParams` (one
source of truth with the offline API); here we only check shapes and types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .outputs import CompletionOutput

CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
    "({prompt} in the messages, {completion} in the completion). Please reduce the length of the messages "
    "or completion."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        """An explicit `null` means "not given" (the SDKs' types allow it): the field's default applies."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints: OpenAI's, then vLLM's extras."""

    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # vLLM's: a tenant's own prefix cache
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's guided decoding extras
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = None  # vLLM's: the top-k logprobs of every prompt token
    # Informational: accepted and ignored.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        """(param, message) for each value kiln refuses; all of them, so one 400 names every problem."""
        return []

    @model_validator(mode="after")
    def _refuse(self) -> _SamplingFields:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{param}: {message}" for param, message in problems))
        return self

    def sampling_options(self) -> dict[str, Any]:
        """The fields SamplingParams takes, leaving out those not given (so its defaults apply)."""
        names = (
            "n",
            "stop",
            "seed",
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "top_k",
            "min_p",
            "repetition_penalty",
            "ignore_eos",
            "min_tokens",
            "stop_token_ids",
            "skip_special_tokens",
            "prompt_logprobs",
        )
        options = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if self.logit_bias:  # JSON keys are strings; SamplingParams checks the ids and values
            options["logit_bias"] = {
                int(t) if t.isascii() and t.isdigit() else t: v for t, v in self.logit_bias.items()
            }
        return options


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.suffix:
            found.append(("suffix", "not supported: kiln serves causal models, which do not fill in the middle"))
        if self.best_of is not None:
            if self.best_of < self.n:
                found.append(("best_of", f"must be at least n ({self.n}), got {self.best_of}"))
            if self.stream and self.best_of > self.n:
                found.append(("best_of", "cannot be combined with stream (the best are known only at the end)"))
        return found


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # OpenAI's fields that kiln cannot honour are refused by name (see problems); the rest are hints it ignores.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.audio is not None:
            found.append(("audio", "not supported: kiln generates text only"))
        if self.modalities is not None and list(self.modalities) != ["text"]:
            found.append(("modalities", f"only ['text'] is supported, got {self.modalities!r:.80}"))
        if self.web_search_options is not None:
            found.append(("web_search_options", "not supported: kiln does not search the web"))
        if self.moderation is not None:
            found.append(("moderation", "not supported: kiln runs no moderation model"))
        for name in ("functions", "function_call"):
            if getattr(self, name) is not None:
                found.append((name, "deprecated by OpenAI and not supported; use tools and tool_choice"))
        return found


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def error_body(
    message: str, err_type: str = "invalid_request_error", param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """(message, param): every problem in one message, in OpenAI's words where OpenAI has words for it; param
    names the first."""
    unknown: list[str] = []
    messages: list[str] = []
    params: list[str] = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"]]
        if e["type"] == "json_invalid":
            return f"Invalid JSON body: {e['msg']}", None
        if e["type"] == "extra_forbidden":
            unknown.append(".".join(loc))
            params.append(".".join(loc))
        elif not loc:  # a model-level check: its message lists "param: problem" pairs
            text = str(e.get("ctx", {}).get("error", e["msg"]))
            messages.append(text)
            params.append(text.split(":", 1)[0])
        elif e["type"] == "missing":
            messages.append(f"Missing required parameter: '{loc[0]}'.")
            params.append(loc[0])
        else:
            messages.append(f"Invalid value for '{'.'.join(loc)}': {e['msg']}")
            params.append(loc[0])
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        messages.insert(0, f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}")
    return "; ".join(messages), (params[0] if params else None)


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float] | None], text_offset: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object for a run of tokens (the top-k plus the sampled token; None
    for a token nothing scores, an echoed prompt's first)."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    offsets: list[int] = []
    tops: list[dict[str, float] | None] = []
    for tid, lp in zip(token_ids, logprobs):
        text = token_text(tokenizer, tid)
        tokens.append(text)
        if lp is None:  # an echoed prompt's first token: nothing scores it
            token_lps.append(None)
            tops.append(None)
            offsets.append(text_offset)
            text_offset += len(text)
            continue
        token_lps.append(lp.get(tid))
        top: dict[str, float] = {}
        for t, v in sorted(lp.items(), key=lambda kv: -kv[1]):
            top.setdefault(token_text(tokenizer, t), v)  # distinct ids can share a text: keep the likeliest
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> dict[str, Any]:
    """The chat `logprobs.content` list: each token with its logprob and the `top` most likely tokens."""

    def entry(tid: int, value: float) -> dict[str, Any]:
        text = token_text(tokenizer, tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, lp in zip(token_ids, logprobs):
        best = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
        content.append({**entry(tid, lp[tid]), "top_logprobs": [entry(t, v) for t, v in best]})
    return {"content": content}


def vllm_prompt_logprobs(tokenizer: Any, entries: list[dict[int, float] | None]) -> list[Any]:
    """vLLM's `prompt_logprobs` on a choice: per prompt token None (the first) or {id: {logprob, decoded_token}}."""
    return [
        None
        if entry is None
        else {str(t): {"logprob": v, "decoded_token": token_text(tokenizer, t)} for t, v in entry.items()}
        for entry in entries
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_fields(out: CompletionOutput) -> dict[str, Any]:
    """finish_reason plus vLLM's stop_reason (the stop string or token id that ended the choice)."""
    return {"finish_reason": out.finish_reason, "stop_reason": out.stop_reason}

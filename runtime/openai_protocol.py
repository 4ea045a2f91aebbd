"""Request models and response pieces of the OpenAI-compatible API served by `kiln.runtime.server`.

Models are strict and refuse unknown fields, so that a misspelt option is a 400 naming it rather than a
silently ignored setting. Values are range-checked by `SamplingParams` (one source of truth with the
offline API); here we only check shapes and types.
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
        )
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None


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
    """(message, param) for the first problem, in OpenAI's words where OpenAI has words for it."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "json_invalid":
        return f"Invalid JSON body: {first['msg']}", None
    if first["type"] == "extra_forbidden":
        name = ".".join(loc)
        return f"Unrecognized request argument supplied: {name}", name
    if not loc:
        return f"Request body: {first['msg']}", None
    if first["type"] == "missing":
        return f"Missing required parameter: '{loc[0]}'.", loc[0]
    return f"Invalid value for '{loc[0]}': {first['msg']}", loc[0]


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, float]], text_offset: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object for a run of tokens (the top-k plus the sampled token)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(token_ids, logprobs):
        text = token_text(tokenizer, tid)
        tokens.append(text)
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_fields(out: CompletionOutput) -> dict[str, Any]:
    """finish_reason plus vLLM's stop_reason (the stop string or token id that ended the choice)."""
    return {"finish_reason": out.finish_reason, "stop_reason": out.stop_reason}

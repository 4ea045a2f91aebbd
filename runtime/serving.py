"""The core of the OpenAI-compatible server: request checking, engine submission, and the errors both raise.

Every request is fully checked (body size, JSON, fields, model, limits, SamplingParams, context length) and
its first output is awaited before a response starts, so every refusal is a 400 in OpenAI's error shape and
never a broken stream. Client disconnects cancel the work, which aborts the engine requests and frees their
KV blocks at once. `server_routes` turns these into the routes and wire formats; `server` builds the app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from . import openai_protocol as proto
from .async_engine import AsyncLLMEngine
from .metrics import ServerMetrics
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .structured_output import StructuredOutput

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


@dataclass(frozen=True)
class ServerLimits:
    """Caps that keep one request from monopolising the server (SamplingParams has its own, looser ones)."""

    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_stop: int = 16
    max_prompts: int = 32
    max_seqs: int = 64  # prompts x n: the sequences one request may put in the engine
    body_timeout: float = 30.0  # seconds to receive a whole body (slow-body clients are cut off)
    chars_per_token: int = 64  # a text over max_model_len * this cannot fit the context: refused untokenized

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        err_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, proto.error_body(message, err_type, param, code)


class ClientGone(Exception):
    """The client disconnected before the response started."""


def _param_of(err: ValueError, renames: dict[str, str]) -> str | None:
    """SamplingParams and the engine start their messages with the parameter's name."""
    word = str(err).split(" ", 1)[0]
    known = {f.name for f in dataclasses.fields(SamplingParams)} | {"prompt"}
    return renames.get(word, word) if word in known else None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Any) -> Any:
    """Await `awaitable` in a task that is cancelled (aborting its engine requests) if the client leaves."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the handler itself is cancelled
        watch.cancel()
        if not work.done():
            work.cancel()
    if work not in done:
        raise ClientGone()
    return work.result()


class Merged:
    """One generate() stream per prompt, interleaved. The queue holds at most one output per stream, so a consumer
    that stops reading (a stalled client) stops the pumps and leaves the engine's mailboxes unread, which the
    engine's stall timeout then aborts; nothing piles up here. close() cancels the pumps, which aborts the engine
    requests at once: asyncio's Task.cancel always lands, unlike a cancel scope's, which an engine loop that feeds
    the queue every step can starve (a dropped client would then keep generating)."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, len(streams)))
        self.tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]
        self.remaining = len(self.tasks)

    async def _pump(self, i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await self.queue.put((i, out))
        except Exception as exc:  # handed to the consumer, which owns error reporting
            await self.queue.put((i, exc))
            return
        await self.queue.put((i, None))

    def __aiter__(self) -> Merged:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while self.remaining:
            i, item = await self.queue.get()
            if item is None:
                self.remaining -= 1
            elif isinstance(item, Exception):
                self.close()
                raise item
            else:
                return i, item
        raise StopAsyncIteration

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()


def _template_message(m: proto.ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: tool calls with their arguments parsed (HF's convention)."""
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                arguments: Any = json.loads(c.function.arguments)
            except ValueError:
                arguments = c.function.arguments
            calls.append(
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}}
            )
        out["tool_calls"] = calls
    return out


def requested_structure(req: Any) -> tuple[StructuredOutput | None, str | None]:
    """The output constraint of `response_format` or a vLLM `guided_*` field, and that field's name (at most one
    may be given). `json_schema.strict` is accepted; the schema is enforced either way."""
    fmt = req.response_format
    given = (["response_format"] if fmt is not None and fmt.type != "text" else []) + [
        g for g in GUIDED if getattr(req, g) is not None
    ]
    if len(given) > 1:
        raise APIError(400, f"Give at most one of response_format and guided_*; got {', '.join(given)}.", given[1])
    if not given:
        return None, None
    name = given[0]
    try:
        if name == "response_format":
            if fmt.type == "json_object":
                return StructuredOutput(json_object=True), name
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema.", name)
            return StructuredOutput(json=fmt.json_schema.schema_), name
        kind = name.removeprefix("guided_")
        return StructuredOutput(**{kind: getattr(req, name)}), name
    except ValueError as err:
        raise APIError(400, f"Invalid {name}: {err}", name) from None


class OpenAIServing:
    """Turns OpenAI requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, limits: ServerLimits, metrics: ServerMetrics) -> None:
        self.engine, self.model_name, self.limits, self.metrics = engine, model_name, limits, metrics
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        config = getattr(engine.engine.model, "hf_config", None)
        self.model_type: str | None = getattr(config, "model_type", None)  # picks the tool-call parser

    async def parse(self, request: Request, model_cls: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"Request body exceeds {self.limits.max_body_bytes} bytes.", code="request_too_large")
        if declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise too_big
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > self.limits.max_body_bytes:
                    raise too_big

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.limits.body_timeout:g} s.") from None
        try:
            req = model_cls.model_validate_json(bytes(body))
        except ValidationError as err:
            message, param = proto.describe_validation_error(err)
            raise APIError(400, message, param) from None
        model = getattr(req, "model", None)
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return req

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Tokenize off the event loop (a large text must not stall other clients' streams), after refusing a
        text too long to fit the context whatever its tokens."""
        if self.tokenizer is None:
            raise APIError(400, "This model has no tokenizer; send token ids.", param)
        limit = self.max_model_len * self.limits.chars_per_token
        if len(text) > limit:
            raise APIError(400, f"The text has {len(text)} characters; at most {limit} can fit the context.", param)
        tokens = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return list(tokens)

    def check_fanout(self, num_prompts: int, n: int) -> None:
        """Refuse, before any tokenizing, a request that would put too many sequences in the engine."""
        if num_prompts > self.limits.max_prompts:
            raise APIError(400, f"At most {self.limits.max_prompts} prompts per request, got {num_prompts}.", "prompt")
        if num_prompts * n > self.limits.max_seqs:
            message = f"prompts x n must be at most {self.limits.max_seqs}, got {num_prompts} x {n}."
            raise APIError(400, message, "n")

    async def chat_prompt(
        self,
        messages: list[proto.ChatMessage],
        add_generation_prompt: bool = True,
        tools: list[proto.Tool] | None = None,
    ) -> list[int]:
        """The prompt's tokens from the chat template, given the messages (tool calls and results included)
        and the tools, which the template renders in the model's own format."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This model has no chat template; use /v1/completions.", "messages")
        plain = [_template_message(m) for m in messages]
        if sum(len(m["content"]) for m in plain) > self.max_model_len * self.limits.chars_per_token:
            raise APIError(400, "The messages are too long to fit the context.", "messages")
        extra = {"tools": [t.model_dump(by_alias=True, exclude_none=True) for t in tools]} if tools else {}
        try:
            text = await asyncio.to_thread(
                self.tokenizer.apply_chat_template,
                plain,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        except Exception as err:  # the template's own refusals (e.g. roles out of order) are the client's
            raise APIError(400, f"The chat template rejected the messages: {err}", "messages") from None
        return await self.encode(text, add_special_tokens=False, param="messages")  # the template holds the BOS

    def sampling_params(
        self,
        req: Any,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        renames: dict[str, str],
        structured: StructuredOutput | None = None,
    ) -> SamplingParams:
        if req.n > self.limits.max_n:
            raise APIError(400, f"n must be at most {self.limits.max_n}, got {req.n}.", "n")
        if isinstance(req.stop, list) and len(req.stop) > self.limits.max_stop:
            raise APIError(400, f"stop may hold at most {self.limits.max_stop} sequences, got {len(req.stop)}.", "stop")
        try:
            params = SamplingParams(
                **req.sampling_options(),
                logprobs=logprobs,
                max_tokens=1 if max_tokens is None else max_tokens,
                structured_output=structured,
            )
        except ValueError as err:
            raise APIError(400, str(err), _param_of(err, renames)) from None
        longest = max(len(p) for p in prompts)
        if max_tokens is None:  # chat without a limit: the rest of the context, as vLLM does
            max_tokens = max(self.max_model_len - longest, 0)
        if max_tokens < 1 or longest + max_tokens > self.max_model_len:
            message = proto.CONTEXT_LENGTH_MESSAGE.format(
                limit=self.max_model_len, total=longest + max_tokens, prompt=longest, completion=max_tokens
            )
            raise APIError(400, message, renames.get("prompt", "prompt"), "context_length_exceeded")
        return dataclasses.replace(params, max_tokens=max_tokens)

    async def compile_grammar(self, params: SamplingParams, param: str | None) -> None:
        """Compile the request's grammar (and on first use the grammar engine's tokenizer) off the event loop,
        so other streams do not stall; the engine then finds it cached. A grammar it rejects is a 400."""
        spec = params.structure
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.engine.engine.grammars.matcher, spec)
        except ValueError as err:
            message = str(err)
            if param and message.startswith("structured_output"):
                message = param + message[len("structured_output") :]
            raise APIError(400, message, param) from None

    async def start(
        self,
        request: Request,
        prompts: list[list[int]],
        params: SamplingParams,
        renames: dict[str, str],
        salt: str | None = None,
    ) -> tuple[tuple[int, RequestOutput], Merged]:
        """Submit one engine request per prompt and wait for the first output (or the first refusal)."""
        rid = uuid.uuid4().hex
        merged = Merged([self.engine.generate(p, params, f"{rid}-{i}", salt) for i, p in enumerate(prompts)])
        try:
            first = await _unless_disconnected(request, merged.__anext__())
        except ValueError as err:
            message, param = str(err), _param_of(err, renames)
            if message.startswith("structured_output") and param:  # name the field the constraint came from
                message = param + message[len("structured_output") :]
            raise APIError(400, message, param) from None
        except BaseException:
            merged.close()
            raise
        return first, merged

    async def collect(
        self, request: Request, first: tuple[int, RequestOutput], merged: Merged, num_prompts: int
    ) -> list[RequestOutput]:
        """Run to completion, unless the client leaves first."""
        finals: dict[int, RequestOutput] = {first[0]: first[1]}

        async def rest() -> None:
            async for i, out in merged:
                finals[i] = out

        try:
            await _unless_disconnected(request, rest())
        finally:
            merged.close()
            self.account(finals.values())
        return [finals[i] for i in range(num_prompts)]

    def account(self, outputs: Any) -> None:
        for out in outputs:
            self.metrics.record_request(out)

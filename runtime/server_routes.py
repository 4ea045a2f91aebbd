"""The routes `kiln.runtime.server` registers on its app, and the OpenAI wire formats of completions, whole and
streamed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from . import openai_protocol as proto
from .outputs import CompletionOutput, RequestOutput
from .serving import APIError, Merged, OpenAIServing, requested_structure
from .structured_output import StructuredOutput
from .tool_calls import ToolCalling

CHAT_RENAMES = {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs", "prompt": "messages"}


class _Writer:
    """Builds completion or chat-completion bodies and stream chunks, tracking what each choice has sent."""

    def __init__(
        self,
        serving: OpenAIServing,
        chat: bool,
        n: int,
        top_logprobs: int | None,
        tools: ToolCalling | None = None,
        echo: bool = False,
    ) -> None:
        self.serving, self.chat, self.n, self.top, self.tools = serving, chat, n, top_logprobs, tools
        self.echo = echo  # completions: the prompt's text (and with logprobs its tokens') before each choice's
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars, tokens) already streamed
        self.done: set[int] = set()

    def _envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.serving.model_name,
            "choices": choices,
        }

    def _best(self, outputs: list[CompletionOutput]) -> list[CompletionOutput]:
        """With best_of > n: the n completions of highest cumulative logprob, best first, renumbered."""
        if len(outputs) <= self.n:
            return outputs
        ranked = sorted(outputs, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[: self.n]
        return [dataclasses.replace(c, index=i) for i, c in enumerate(ranked)]

    def _echoed(self, out: RequestOutput) -> tuple[str, list[int], list]:
        """The prompt as an echo prefixes a choice: text, token ids, logprobs (the first None)."""
        ids = out.prompt_token_ids
        tok = self.serving.tokenizer
        text = out.prompt if out.prompt is not None else (tok.decode(ids) if tok is not None else "")
        return text, ids, list(out.prompt_logprobs or [None] * len(ids))

    def _extras(self, out: RequestOutput) -> dict[str, Any]:
        """vLLM's prompt_logprobs on each choice, when asked."""
        if out.prompt_logprobs is None or self.chat:
            return {}
        return {"prompt_logprobs": proto.vllm_prompt_logprobs(self.serving.tokenizer, out.prompt_logprobs)}

    def _logprobs(self, token_ids: list[int], logprobs: list | None, text_offset: int) -> dict[str, Any] | None:
        if logprobs is None or self.top is None:
            return None
        tok = self.serving.tokenizer
        if self.chat:
            return proto.chat_logprobs(tok, token_ids, logprobs, self.top)
        return proto.completion_logprobs(tok, token_ids, logprobs, text_offset)

    def opening(self, num_prompts: int) -> list[dict[str, Any]]:
        if not self.chat:
            return []
        return [
            self._envelope(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
                True,
            )
            for i in range(num_prompts * self.n)
        ]

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[dict[str, Any]]:
        chunks = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            chars, tokens = self.sent.get(index, (0, 0))
            text, new_ids = c.text[chars:], c.token_ids[tokens:]
            new_lps = c.logprobs[tokens:] if c.logprobs is not None else None
            offset, extras = chars, {}
            if self.echo:
                prompt_text, prompt_ids, prompt_lps = self._echoed(out)
                offset += len(prompt_text)
                if index not in self.sent:  # the choice's first chunk carries the prompt
                    text, new_ids, offset = prompt_text + text, prompt_ids + new_ids, 0
                    new_lps = prompt_lps + new_lps if new_lps is not None else None
                    extras = self._extras(out)
            finishing = c.finish_reason is not None and index not in self.done
            if not (text or finishing or (new_ids and self.top is not None)):
                continue
            lps = self._logprobs(new_ids, new_lps, offset)
            self.sent[index] = (len(c.text), len(c.token_ids))
            if finishing:
                self.done.add(index)
            finish: dict[str, Any] = (
                proto.finish_fields(c) if finishing else {"finish_reason": None, "stop_reason": None}
            )
            body: dict[str, Any] = {"delta": {"content": text} if text else {}} if self.chat else {"text": text}
            if self.tools is not None:
                delta, finish["finish_reason"] = self.tools.delta(index, c.text, finish["finish_reason"])
                if delta is None and not finishing and not (new_ids and self.top is not None):
                    continue
                body = {"delta": delta or {}}
            chunks.append(self._envelope([{"index": index, **body, "logprobs": lps, **finish, **extras}], True))
        return chunks

    def whole(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, out in enumerate(outs):
            for c in self._best(out.outputs):
                body: dict[str, Any] = (
                    {"message": {"role": "assistant", "content": c.text}} if self.chat else {"text": c.text}
                )
                finish = proto.finish_fields(c)
                if self.tools is not None:
                    body["message"], finish["finish_reason"] = self.tools.message(c.text, c.finish_reason)
                ids, lps = c.token_ids, c.logprobs
                if self.echo:
                    prompt_text, prompt_ids, prompt_lps = self._echoed(out)
                    body["text"] = prompt_text + c.text
                    ids, lps = prompt_ids + ids, (prompt_lps + lps if lps is not None else None)
                choices.append(
                    {
                        "index": p * self.n + c.index,
                        **body,
                        "logprobs": self._logprobs(ids, lps, 0),
                        **finish,
                        **self._extras(out),
                    }
                )
        return {**self._envelope(choices, False), "usage": self.usage(outs)}

    @staticmethod
    def usage(outs: Any) -> dict[str, int]:
        outs = list(outs)
        return proto.usage(
            sum(len(o.prompt_token_ids) for o in outs), sum(len(c.token_ids) for o in outs for c in o.outputs)
        )


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """Aborts the engine requests as soon as the client is gone, however Starlette learns of it."""

    def __init__(self, events: AsyncIterator[str], merged: Merged) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.merged = merged

    async def listen_for_disconnect(self, receive: Any) -> None:
        await super().listen_for_disconnect(receive)
        self.merged.close()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.merged.close()
            aclose = getattr(self.body_iterator, "aclose", None)  # an async generator's; typed as AsyncIterable
            if aclose is not None:
                await aclose()


async def _events(
    serving: OpenAIServing,
    writer: _Writer,
    first: tuple[int, RequestOutput],
    merged: Merged,
    num_prompts: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    last: dict[int, RequestOutput] = {}
    try:
        for chunk in writer.opening(num_prompts):
            yield sse(chunk)
        i, out = first
        while True:
            last[i] = out
            for chunk in writer.deltas(i, out):
                yield sse(chunk)
            try:
                i, out = await merged.__anext__()
            except StopAsyncIteration:
                break
        if include_usage:
            yield sse({**writer._envelope([], True), "usage": writer.usage(last.values())})
    except Exception as err:  # the 200 status line is gone; report in-band as vLLM does
        yield sse(proto.error_body(f"Generation failed: {err}", "server_error", code=500))
    finally:
        merged.close()
        serving.account(last.values())
    yield "data: [DONE]\n\n"


async def _respond(
    serving: OpenAIServing,
    request: Request,
    req: Any,
    prompts: list[list[int]],
    chat: bool,
    max_tokens: int | None,
    logprobs: int | None,
    tools: ToolCalling | None = None,
    tool_structure: StructuredOutput | None = None,
) -> Response:
    renames = dict(CHAT_RENAMES if chat else {})
    structured, source = requested_structure(req)
    if tool_structure is not None:
        if structured is not None:
            raise APIError(400, f"tool_choice {tools and tools.mode!r} cannot be combined with {source}.", source)
        structured, source = tool_structure, "tool_choice"
    if source is not None:
        renames["structured_output"] = source
    params = serving.sampling_params(req, prompts, max_tokens, logprobs, renames, structured)
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of > req.n:  # sample best_of, keep the n likeliest: cumulative logprobs needed
        logprob_k = params.logprobs if params.logprobs is not None else 0
        params = dataclasses.replace(params, n=best_of, logprobs=logprob_k)
    echo = bool(getattr(req, "echo", False))
    if echo and logprobs is not None:  # the echoed prompt's tokens come with their logprobs and top-k
        params = dataclasses.replace(params, prompt_logprobs=max(params.prompt_logprobs or 0, logprobs))
    await serving.compile_grammar(params, source)
    first, merged = await serving.start(request, prompts, params, renames, req.cache_salt)
    writer = _Writer(serving, chat, req.n, logprobs, tools, echo)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return _SSEResponse(_events(serving, writer, first, merged, len(prompts), include_usage), merged)
    return JSONResponse(writer.whole(await serving.collect(request, first, merged, len(prompts))))


def tokenizer_card(tokenizer: Any, max_model_len: int) -> dict[str, Any]:
    """The JSON-safe part of a Hugging Face tokenizer's configuration."""
    card: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__, "model_max_length": max_model_len}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "padding_side"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (str, int, float, bool)):
            card[name] = value
    card["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    return card


def register(app: FastAPI, serving: OpenAIServing) -> None:
    """Add the OpenAI routes and vLLM's operational ones to `app`."""
    engine = serving.engine.engine

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await serving.parse(request, proto.CompletionRequest)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)) or raw == []:
            raw = [raw]
        serving.check_fanout(len(raw), max(req.n, req.best_of or 1))
        prompts = [await serving.encode(p) if isinstance(p, str) else list(p) for p in raw]
        return await _respond(serving, request, req, prompts, False, req.max_tokens, req.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await serving.parse(request, proto.ChatCompletionRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        serving.check_fanout(1, req.n)
        try:
            tools, tool_structure = ToolCalling.build(req, serving.model_type)
        except ValueError as err:
            raise APIError(400, str(err), "tool_choice" if str(err).startswith("tool_choice") else "tools") from None
        prompt = await serving.chat_prompt(req.messages, tools=req.tools)
        return await _respond(serving, request, req, [prompt], True, max_tokens, logprobs, tools, tool_structure)

    def model_card() -> dict[str, Any]:
        return {
            "id": serving.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "kiln",
            "max_model_len": serving.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != serving.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", "model", "model_not_found")
        return model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's: the tokenizer's special tokens, chat template and settings, for clients that tokenize
        remotely (lm-evaluation-harness's `tokenizer_backend=remote`)."""
        if serving.tokenizer is None:
            raise APIError(404, "This model has no tokenizer.", code="no_tokenizer")
        return tokenizer_card(serving.tokenizer, serving.max_model_len)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine can serve; 503 once it cannot (a tensor-parallel rank died), so that a supervisor
        (Ray Serve, Kubernetes) replaces this server."""
        try:
            serving.engine.engine.check_health()
        except RuntimeError as err:
            return JSONResponse(proto.error_body(str(err), "server_error", None, "engine_dead"), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from kiln.version import __version__

        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await serving.parse(request, proto.TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "Give exactly one of 'prompt' and 'messages'.", "prompt")
        if req.messages is not None:
            tokens = await serving.chat_prompt(req.messages, req.add_generation_prompt)
        else:
            tokens = await serving.encode(req.prompt, req.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, str]:
        req = await serving.parse(request, proto.DetokenizeRequest)
        if serving.tokenizer is None:
            raise APIError(400, "This model has no tokenizer.", "tokens")
        if not all(0 <= t < engine.vocab_size for t in req.tokens):
            raise APIError(400, f"tokens must be integers in [0, {engine.vocab_size}).", "tokens")
        if len(req.tokens) > serving.max_model_len:
            raise APIError(400, f"At most {serving.max_model_len} tokens (max_model_len).", "tokens")
        return {"prompt": await asyncio.to_thread(serving.tokenizer.decode, req.tokens)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            serving.metrics.render(engine.stats()), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

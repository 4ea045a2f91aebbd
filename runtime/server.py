"""An OpenAI-compatible HTTP server over `AsyncLLMEngine` (`kiln serve`), in vLLM's shape: the app factory and
`serve`. The request handling lives in `serving` (checks, engine submission, errors), the routes and wire formats
in `server_routes`, the request models in `openai_protocol`.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_protocol as proto
from .async_engine import AsyncLLMEngine
from .metrics import ServerMetrics
from .server_routes import register
from .serving import APIError, ClientGone, OpenAIServing, ServerLimits

ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/{id}",
    "/health",
    "/version",
    "/tokenize",
    "/detokenize",
    "/tokenizer_info",
    "/metrics",
)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class _Guard:
    """ASGI middleware in front of every route: the Host check, the API key, JSON-only POSTs, and per-route
    request counts for /metrics.

    With an API key every route but /health needs it (/metrics too, unless `open_metrics`: its prefix-cache
    counters reveal what other clients' prompts share). `allowed_hosts` (the loopback names when the server is
    bound to loopback) refuses requests whose Host header names another host, so that a web page cannot drive a
    local server through DNS rebinding; and a POST must say `application/json`, which a cross-site form cannot.
    """

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        metrics: ServerMetrics,
        open_metrics: bool = False,
        allowed_hosts: frozenset[str] | None = None,
    ) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.open = {"/health", "/metrics"} if open_metrics else {"/health"}
        self.allowed_hosts = allowed_hosts

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None and _hostname(headers.get(b"host", b"")) not in self.allowed_hosts:
            body = proto.error_body("The Host header names a host this server does not serve.", code="bad_host")
            return JSONResponse(body, status_code=400)
        if self.expected is not None and scope["path"] not in self.open:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                body = proto.error_body("Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(body, status_code=401)
        if scope["method"] == "POST":
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json":
                body = proto.error_body("Request bodies must be JSON (Content-Type: application/json).")
                return JSONResponse(body, status_code=415)
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"
        if scope["path"].startswith("/v1/models/"):
            path = "/v1/models/{id}"

        async def counting_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_http(path, message["status"])
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)


def host_allowlist(host: str, allowed_hosts: list[str] | None) -> frozenset[str] | None:
    """The Host names to answer: those given, plus the loopback names when bound to loopback (None: any)."""
    hosts: frozenset[str] | None = frozenset(h.lower() for h in allowed_hosts) if allowed_hosts else None
    return LOOPBACK_HOSTS | (hosts or frozenset()) if host in LOOPBACK_HOSTS else hosts


def _hostname(host: bytes) -> str:
    """The host name of a Host header value: without the port, without IPv6 brackets, lower case."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def build_app(
    engine: AsyncLLMEngine,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    *,
    open_metrics: bool = False,
    allowed_hosts: frozenset[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; every route but /health needs `Bearer api_key` when one
    is set (/metrics too unless open_metrics); allowed_hosts, when given, are the only Host names answered."""
    metrics = ServerMetrics()
    serving = OpenAIServing(engine, model_name, limits or ServerLimits(), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown()

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics, open_metrics=open_metrics, allowed_hosts=allowed_hosts)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; the status only shows in /metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(proto.error_body(str(err.detail), code=err.status_code), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        body = proto.error_body(f"Internal server error: {type(err).__name__}", "server_error", code=500)
        return JSONResponse(body, status_code=500)

    register(app, serving)
    return app


def serve(
    model: str | Path | Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    served_model_name: str | None = None,
    limits: ServerLimits | None = None,
    log_level: str = "info",
    open_metrics: bool = False,
    allowed_hosts: list[str] | None = None,
    stall_timeout: float = 60.0,
    **engine_options: Any,
) -> None:
    """Compile `model` (a checkpoint directory or a CompiledModel) and serve it until interrupted. Bound to a
    loopback address, only loopback Host names (plus `allowed_hosts`) are answered; elsewhere, `allowed_hosts`
    restricts the Host names when given. A streaming client that reads nothing for `stall_timeout` seconds is
    aborted and its KV blocks freed."""
    import uvicorn

    engine = AsyncLLMEngine.from_model(
        str(model) if isinstance(model, Path) else model, stall_timeout, **engine_options
    )
    name = served_model_name or (Path(model).name if isinstance(model, (str, Path)) else "kiln-model")
    hosts = host_allowlist(host, allowed_hosts)
    app = build_app(engine, name, api_key, limits, open_metrics=open_metrics, allowed_hosts=hosts)
    from .http_protocol import header_timeout_protocol

    # Slow clients: headers must arrive within 10 s, idle keep-alive connections close after 5 s, and a body
    # that stalls is cut off by ServerLimits.body_timeout.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        http=header_timeout_protocol(10.0),
    )

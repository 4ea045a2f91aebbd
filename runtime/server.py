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
    "/health",
    "/version",
    "/tokenize",
    "/detokenize",
    "/metrics",
)


class _Guard:
    """ASGI middleware: API-key check on /v1 routes and per-route request counts for /metrics."""

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ROUTES else "other"

        async def counting_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_http(path, message["status"])
            await send(message)

        if self.expected is not None and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = proto.error_body("Incorrect API key provided.", code="invalid_api_key")
                return await JSONResponse(body, status_code=401)(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)


def build_app(
    engine: AsyncLLMEngine, model_name: str, api_key: str | None = None, limits: ServerLimits | None = None
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; /v1 routes need `Bearer api_key` when one is set."""
    metrics = ServerMetrics()
    serving = OpenAIServing(engine, model_name, limits or ServerLimits(), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown()

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

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
    **engine_options: Any,
) -> None:
    """Compile `model` (a checkpoint directory or a CompiledModel) and serve it until interrupted."""
    import uvicorn

    engine = AsyncLLMEngine.from_model(str(model) if isinstance(model, Path) else model, **engine_options)
    name = served_model_name or (str(model) if isinstance(model, (str, Path)) else "kiln-model")
    app = build_app(engine, name, api_key, limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

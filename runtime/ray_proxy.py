"""What kiln adds to Ray Serve's HTTP proxy (`kiln serve --ray`): its own errors in OpenAI's shape.

A module of its own, importing nothing heavy: the proxy imports it when it starts (through PROXY_ENV, which
runtime/ray_serve.py sets for a cluster it starts itself), and must not wait for torch to do so.
"""

from __future__ import annotations

import json
from typing import Any

from .openai_protocol import error_body

# Makes Ray's HTTP proxy answer its own errors in OpenAI's shape; read by the proxy when the cluster starts.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "kiln.runtime.ray_proxy:proxy_middlewares"}


class OpenAIErrors:
    """ASGI middleware for Ray's HTTP proxy: the plain-text 5xx the proxy answers itself (a replica died under
    the request, or none can take it) becomes a JSON error in OpenAI's shape, so clients see the same kind of
    error as from kiln. kiln's own responses, JSON errors and streams included, pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}
        started = False

        async def reply(status: int, text: bytes) -> None:
            detail = text.decode("utf-8", "replace").strip() or "no detail"
            reason = f"The Ray Serve replica handling this request failed ({detail}); retry the request."
            body = json.dumps(error_body(reason, "server_error", code=status)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        async def rewrite(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if message["status"] >= 500 and not content_type.startswith(b"application/json"):
                    held.update(status=message["status"], text=b"")
                    return
                started = True
            elif message["type"] == "http.response.body" and held:
                held["text"] += message.get("body", b"")
                if not message.get("more_body"):
                    await reply(held["status"], held["text"])
                return
            await send(message)

        try:
            await self.app(scope, receive, rewrite)
        except Exception as err:  # the proxy gave up on the replica before a response started
            if started:
                raise
            await reply(held.get("status", 500), held.get("text") or type(err).__name__.encode())


def proxy_middlewares() -> list[Any]:
    """Ray Serve's HTTP proxy callback (PROXY_ENV): the middleware its proxy runs."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]

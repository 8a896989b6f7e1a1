"""GuardMiddleware: the outermost layer of our own: `X-Content-Type-Options: nosniff` on every response; a body
with a Content-Encoding is a 415 (nothing here decodes gzip); a client that leaves while still sending its body is
counted as its abort (499), quietly; any other exception nobody handled becomes a logged (with its traceback),
counted, OpenAI-shaped 500.

Starlette's own last resort answers `500 text/plain Internal Server Error`, logs the exception a second
time through uvicorn and counts nothing; this layer sits inside it, so that never happens.

    python -m pytest tests/test_server_http.py -q -k "500 or nosniff"
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .schemas import APIError

log = logging.getLogger("loopgpt.server")

# requests_total's `endpoint` label for each route; other paths cannot raise (they are 404s).
ENDPOINT_LABELS = {"/generate": "generate", "/v1/completions": "completions", "/v1/chat/completions": "chat",
                   "/v1/models": "models", "/tokenize": "tokenize", "/detokenize": "detokenize",
                   "/tokenizer_info": "tokenizer_info", "/health": "health", "/metrics": "metrics", "/": "index",
                   "/docs": "docs", "/openapi.json": "openapi"}
NOSNIFF = (b"x-content-type-options", b"nosniff")


class GuardMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), NOSNIFF]}
            await send(message)

        path = scope.get("path", "")
        encoding = dict(scope.get("headers") or []).get(b"content-encoding", b"identity").decode("latin-1")
        if encoding.strip().lower() != "identity":
            count(scope, ENDPOINT_LABELS.get(path, "other"), 415)
            error = APIError(415, f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed",
                             code="unsupported_media_type")
            await reply(send_with_headers, error.status, error.body())
            return
        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:  # the client left before its body was read: its abort, not our error
            log.info("client left while sending its body: %s %s", scope.get("method"), path)
            count(scope, ENDPOINT_LABELS.get(path, "other"), 499)
        except Exception:  # the last resort: a bug of ours, never the client's input
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            count(scope, ENDPOINT_LABELS.get(path, "other"), 500)
            if started:  # a stream already answered 200: all we can do is end it, which the server does
                return
            error = APIError(500, "internal server error: the server logged the cause; please report it",
                             code="internal_error")
            await reply(send_with_headers, error.status, error.body())


async def reply(send: Send, status: int, body: dict) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def count(scope: Scope, endpoint: str, code: int) -> None:
    """Count the outcome in requests_total once: not if the route already counted this request."""
    app: Any = scope.get("app")
    state = getattr(getattr(app, "state", None), "loopgpt", None)
    request_state = scope.get("state") or {}
    if state is None or state.metrics is None or request_state.get("counted"):
        return
    state.metrics.request(endpoint, request_state.get("loops"), code)


class ReplicaHeader:
    """Names the replica that answered (`x-loopgpt-replica`), so that a client behind a router (Ray's proxy,
    a Kubernetes Service) can count who served it. Pure ASGI: streaming and disconnects pass through untouched."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (b"x-loopgpt-replica", name.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)

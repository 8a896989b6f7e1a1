"""The FastAPI app factory: state, lifespan (load the model off the event loop, run the engine),
error rendering, and the small routes (`/health`, `/v1/models`, `/metrics`, `/`).

    loopgpt serve --checkpoint checkpoints/demo      # builds this app and runs it under uvicorn
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from .engine import Engine
from .metrics import ServerMetrics
from .routes import router
from .runner import Loaded, ModelRunner
from .schemas import APIError

log = logging.getLogger("loopgpt.server")
STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class ServerOptions:
    max_batch: int = 8
    max_queue: int = 64
    max_body: int = 1 << 20  # bytes
    api_key: str | None = None
    prompt_nll: bool = True
    prefill_chunk: int = 128  # prompt tokens prefilled per engine turn (chunked prefill)
    replica: str | None = None  # sent as `x-loopgpt-replica` on every response (Ray replica id, pod name)


@dataclass
class ServerState:
    """Everything the routes read; `engine` stays None until the model is loaded."""

    loader: Callable[[], Loaded]
    options: ServerOptions
    loaded: Loaded | None = None
    engine: Engine | None = None
    metrics: ServerMetrics | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: str | None = None
    on_fatal: Callable[[str], None] | None = None

    @property
    def config(self) -> Any:
        return self.loaded.model.config

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def max_body(self) -> int:
        return self.options.max_body

    def load(self) -> None:
        try:
            loaded = self.loader()
            runner = ModelRunner(loaded.model, self.options.max_batch, device=loaded.device)
        except (ValueError, OSError) as e:  # CheckpointError, BackendError, unreadable files
            self.load_error = str(e)
            log.error("cannot load the model: %s", e)
            if self.on_fatal:
                self.on_fatal(str(e))
            return
        self.metrics = ServerMetrics(loaded.model.config.loop_cap, loaded.evals)
        engine = Engine(runner, loaded.tokenizer, self.options.max_queue, self.metrics, self.options.prompt_nll,
                        self.options.prefill_chunk)
        engine.start()
        self.loaded, self.engine = loaded, engine
        log.info("model %s loaded on %s: loops 1..%d (trained %d), context %d, max batch %d", loaded.name,
                 loaded.device, self.config.loop_cap, self.config.max_loops, self.config.block_size,
                 self.options.max_batch)

    def authorize(self, http: HTTPRequest) -> None:
        key = self.options.api_key
        if not key:
            return
        given = http.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.loaded.tokenizer.encode(prompt)
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", "prompt")
        return list(prompt)

    def check_limits(self, n_prompt: int, max_tokens: int, loops: int) -> None:
        cfg = self.config
        if not 1 <= loops <= cfg.loop_cap:
            raise APIError(400, f"loops must be in 1..{cfg.loop_cap}, got {loops}", "loops")
        if n_prompt < 1:
            raise APIError(400, "prompt is empty: give at least one token of text", "prompt")
        if n_prompt >= cfg.block_size:
            raise APIError(400, f"prompt ({n_prompt} tokens) fills the context of {cfg.block_size} tokens; "
                           "shorten it", "prompt")
        if n_prompt + max_tokens > cfg.block_size:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{cfg.block_size} tokens; shorten the prompt or lower max_tokens", "max_tokens")

    @staticmethod
    def dumps(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


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


def create_app(loader: Callable[[], Loaded], options: ServerOptions | None = None) -> FastAPI:
    """An app that loads the model in a background thread at startup and stops its engine at shutdown."""
    state = ServerState(loader, options or ServerOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="loopgpt-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="loopgpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loopgpt = state
    app.include_router(router)
    if state.options.replica:
        app.add_middleware(ReplicaHeader, name=state.options.replica)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
            return JSONResponse(APIError(503, message, code="not_ready").body(), status_code=503)
        running, waiting = state.engine.counts()
        return JSONResponse({"status": "ok", "model": state.name, "running": running, "waiting": waiting})

    @app.get("/v1/models")
    async def models(http: HTTPRequest) -> JSONResponse:
        state.authorize(http)
        if state.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", code="not_ready")
        cfg = state.config
        evals = (state.loaded.evals or {}).get("loops") or {}
        card = {"id": state.name, "object": "model", "created": state.created, "owned_by": "loopgpt",
                "loops": {"min": 1, "max": cfg.loop_cap, "default": cfg.max_loops, "trained": cfg.max_loops},
                "context": cfg.block_size,
                "eval_loss": {k: v["loss"] for k, v in evals.items() if isinstance(v, dict) and "loss" in v}}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            raise APIError(503, "the model is still loading; retry shortly", code="not_ready")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index() -> HTMLResponse:
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "no playground page is installed (server/static/index.html)")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    return app

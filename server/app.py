"""The FastAPI app factory: state, lifespan (load the model off the event loop, run the engine),
error rendering, and the small routes (`/health`, `/v1/models`, `/metrics`, `/`, `/docs`, `/openapi.json`).

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
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from loopgpt import __version__

from .admission import Admission
from .chat import ChatTemplate
from .chat_routes import router as chat_router
from .engine import Engine, Loaded, build_engine
from .metrics import ServerMetrics
from .middleware import GuardMiddleware, ReplicaHeader
from .offload import Offload
from .openapi import build_openapi, error_responses
from .options import ServerOptions
from .routes import router
from .schemas import APIError, Health, LoopsRange, ModelCard, ModelList

__all__ = ["ServerOptions", "ServerState", "create_app"]

log = logging.getLogger("loopgpt.server")
STATIC = Path(__file__).resolve().parent / "static"
# The pages load only their own files and talk only to this server; none may be framed (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
NOT_LOADED = "the model is still loading; retry shortly"


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
    chat: ChatTemplate | None = None  # the checkpoint's chat template, or the default
    offload: Offload = field(default_factory=Offload)  # threads for templating, BPE, long JSON (server/offload.py)
    admission: Admission | None = None  # the served model's limits and the rules a request is admitted by

    @property
    def config(self) -> Any:
        return self.loaded.model.config

    @property
    def name(self) -> str:
        """The served model's name in /v1/models and in responses: the first --served-model-name, else the
        checkpoint directory's name."""
        return self.admission.name

    @property
    def max_body(self) -> int:
        return self.options.max_body

    def load(self) -> None:
        """Load and start, in the loader thread; ANY failure ends `serve` (on_fatal) with one sentence."""
        try:
            self.start(self.loader())
        except Exception as e:  # logged (with its traceback when unexpected) and fatal
            expected = isinstance(e, ValueError | OSError)  # CheckpointError, MemoryBudgetError, unreadable files
            first_line = (str(e).strip().splitlines() or [""])[0]
            self.load_error = first_line if expected else f"unexpected {type(e).__name__} while loading: {first_line}"
            log.error("cannot load the model: %s", self.load_error, exc_info=not expected)
            if self.on_fatal:
                self.on_fatal(self.load_error)

    def start(self, loaded: Loaded) -> None:
        """The engine over `loaded`: built and run here (a thread), or already running in its own process
        (`loaded.engine`, an EngineClient); its metrics are recorded in this process either way."""
        engine = loaded.engine or build_engine(loaded, self.options)
        cfg = loaded.model.config  # the serving config (caps and KV budget applied)
        # A rendered prompt over twice the largest body is a template repeating its input, never a conversation.
        self.chat = ChatTemplate(loaded.chat_template, max_chars=2 * self.options.max_body)
        try:
            self.chat.check()  # a template that fails, hangs or explodes on a small conversation refuses the checkpoint
        except BaseException:
            if loaded.engine is not None:  # the engine process is already up: it goes with the refusal
                loaded.engine.stop(timeout=5)
            raise
        self.admission = Admission(cfg, self.options, self.options.served_model_name or [loaded.name])
        self.metrics = engine.metrics = ServerMetrics(cfg.loop_cap, loaded.evals, trained=cfg.max_loops)
        engine.start()
        self.loaded, self.engine = loaded, engine
        log.info("model %s loaded on %s: loops 1..%d (trained %d), context %d, max batch %d", self.name,
                 loaded.device, cfg.loop_cap, cfg.max_loops, cfg.block_size, self.options.max_batch)

    def authorize(self, http: HTTPRequest) -> None:
        key = self.options.api_key
        if not key:
            return
        given = http.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def ready(self, http: HTTPRequest) -> None:
        """A route that needs the model: the API key, then the loaded engine (503 while loading)."""
        self.authorize(http)
        if self.engine is None:
            raise APIError(503, NOT_LOADED, code="not_ready")

    def encode_prompt(self, prompt: str | list[int], special: bool = False) -> list[int]:
        """Token ids of a prompt. With `special` (the OpenAI routes and /tokenize, as vLLM reads a prompt), the
        tokenizer's special tokens written in the text (`<|endoftext|>`) are those tokens."""
        if isinstance(prompt, str):
            tokenizer = self.loaded.tokenizer
            return tokenizer.encoding.encode(prompt, allowed_special="all") if special else tokenizer.encode(prompt)
        self.admission.check_token_ids(prompt, "prompt")
        return list(prompt)

    @staticmethod
    def dumps(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def create_app(loader: Callable[[], Loaded], options: ServerOptions | None = None) -> FastAPI:
    """An app that loads the model in a background thread at startup and stops its engine at shutdown."""
    state = ServerState(loader, options or ServerOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="loopgpt-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()
        if state.chat is not None:
            state.chat.close()
        state.offload.close()

    app = FastAPI(title="loopgpt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.loopgpt = state
    app.include_router(router)
    app.include_router(chat_router)
    app.add_middleware(GuardMiddleware)
    if state.options.replica_name:
        app.add_middleware(ReplicaHeader, name=state.options.replica_name)
    app.openapi = lambda: build_openapi(app, state)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    add_info_routes(app, state)
    return app


def add_info_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", response_model=Health, responses=error_responses(503),
             summary="200 when ready; 503 while loading or draining for shutdown")
    async def health() -> JSONResponse:
        if state.engine is None:
            message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
            return JSONResponse(APIError(503, message, code="not_ready").body(), status_code=503)
        if not state.engine.alive():  # the engine process died: fail the probe so that the pod is restarted
            return JSONResponse(APIError(503, "the engine has stopped; the server must be restarted",
                                         code="engine_dead").body(), status_code=503)
        if state.engine.drain_deadline is not None:  # a load balancer must stop sending traffic now
            return JSONResponse(APIError(503, "shutting down: finishing running requests", code="draining").body(),
                                status_code=503)
        running, waiting = state.engine.counts()
        return JSONResponse(Health(model=state.name, running=running, waiting=waiting).model_dump())

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503),
             summary="the served model, its loops range and eval loss per loop count")
    async def models(http: HTTPRequest) -> JSONResponse:
        state.ready(http)
        cfg = state.config
        evals = (state.loaded.evals or {}).get("loops") or {}
        card = ModelCard(id=state.name, created=state.created, context=cfg.block_size,
                         loops=LoopsRange(min=1, max=cfg.loop_cap, default=cfg.max_loops, trained=cfg.max_loops),
                         eval_loss={k: v["loss"] for k, v in evals.items()})
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                          "description": "Prometheus text exposition"}, **error_responses(503)},
             summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if state.metrics is None:
            raise APIError(503, NOT_LOADED, code="not_ready")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, summary="the playground page")
    async def index() -> HTMLResponse:
        return page("index.html")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return page("docs.html")


def page(name: str) -> HTMLResponse:
    path = STATIC / name
    if not path.is_file():
        raise APIError(404, f"page {name} is not installed (server/static/{name})")
    return HTMLResponse(path.read_text(encoding="utf-8"), headers=PAGE_HEADERS)

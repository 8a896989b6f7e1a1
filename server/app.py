"""The FastAPI app factory: state, lifespan (load the model off the event loop, run the engine),
error rendering, and the small routes (`/health`, `/v1/models`, `/metrics`, `/`, `/docs`, `/openapi.json`).

    loopgpt serve --checkpoint checkpoints/demo      # builds this app and runs it under uvicorn
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from loopgpt.model.memory import check_memory
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from loopgpt import __version__

from .chat import ChatTemplate
from .chat_routes import router as chat_router
from .engine import Engine
from .metrics import ServerMetrics
from .middleware import GuardMiddleware, ReplicaHeader
from .openapi import build_openapi, error_responses
from .options import ServerOptions
from .request import Adaptive
from .routes import router
from .runner import Loaded, ModelRunner
from .schemas import APIError, Health, LoopsRange, ModelCard, ModelList
from .speculation import SpecRequest

__all__ = ["ServerOptions", "ServerState", "create_app"]

log = logging.getLogger("loopgpt.server")
STATIC = Path(__file__).resolve().parent / "static"
# The pages load only their own files and talk only to this server; none may be framed (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
KV_SHRINK = "--max-batch, --loop-cap, --max-context or --kv-budget"
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
        opt = self.options
        loaded.model.config = serving_config(loaded.model.config, opt.loop_cap, opt.max_context)
        if opt.kv_budget >= 0:  # a ConfigError sentence names the range
            loaded.model.config = loaded.model.config.with_kv_budget(opt.kv_budget)
        check_memory(loaded.model.config, loaded.device, batch=opt.max_batch + 1,  # + the scratch row
                     dtype_bytes=torch.finfo(loaded.dtype).bits // 8, shrink=KV_SHRINK)
        runner = ModelRunner(loaded.model, opt.max_batch, device=loaded.device, dtype=loaded.dtype,
                             compile=opt.compile, cuda_graphs=opt.cuda_graphs, lanes_per_row=opt.spec_tokens + 1)
        if opt.cuda_graphs or opt.compile:
            log.info("warming up: %d step variants captured/compiled", runner.warmup())
        cfg = loaded.model.config
        self.chat = ChatTemplate(loaded.chat_template)
        self.metrics = ServerMetrics(cfg.loop_cap, loaded.evals, trained=cfg.max_loops)
        engine = Engine(runner, loaded.tokenizer, opt.max_queue, self.metrics, opt.prompt_nll, opt.prefill_chunk)
        engine.start()
        self.loaded, self.engine = loaded, engine
        log.info("model %s loaded on %s: loops 1..%d (trained %d), context %d, max batch %d", loaded.name,
                 loaded.device, cfg.loop_cap, cfg.max_loops, cfg.block_size, opt.max_batch)

    def check_model(self, model: str | None) -> int | None:
        """OpenAI's `model` field: absent, or the served model's id (as OpenAI and vLLM, 404 otherwise), which may
        name a depth: `demo:loops=6` (for clients that can set nothing but the model, lm-eval's loglikelihood
        requests among them). Returns that depth, or None."""
        if model is None or model == self.name:
            return None
        name, _, loops = model.partition(":loops=")
        if name != self.name:
            raise APIError(404, f"the model {model[:100]!r} does not exist here; this server serves {self.name!r} "
                           "(GET /v1/models)", "model", code="model_not_found")
        if not re.fullmatch(r"[0-9]{1,9}", loops):
            raise APIError(400, f"model: a depth is written {self.name}:loops=N, got {model[:100]!r}", "model")
        self.check_loops(int(loops), "model")
        return int(loops)

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
        self.check_token_ids(prompt, "prompt")
        return list(prompt)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", param)

    def check_loops(self, loops: int | str, param: str = "loops") -> None:
        if loops == "auto":
            return
        if not 1 <= loops <= self.config.loop_cap:
            raise APIError(400, f"{param} must be in 1..{self.config.loop_cap}, got {loops}", param)

    def check_choices(self, prompts: int, body: Any) -> None:
        """Every prompt is one queue entry, and its candidates are admitted together: both must fit."""
        rows, queue = self.options.max_batch, self.options.max_queue
        if body.candidates() > rows:
            param = "n" if body.candidates() == body.n else "best_of"
            raise APIError(400, f"{param} ({body.candidates()}) exceeds the {rows} rows this server decodes together "
                           "(--max-batch)", param)
        if prompts > queue:
            raise APIError(400, f"prompt: {prompts} prompts exceed the {queue} requests this server queues "
                           "(--max-queue); send fewer per request", "prompt")

    def adaptive(self, body: Any, loops: int | str) -> tuple[int, Adaptive | None]:
        """(loops the engine runs at most, the adaptive policy or None) from `loops` and its companion fields."""
        cfg = self.config
        if body.min_loops is not None:  # a bad value is refused even where it would not be used
            self.check_loops(body.min_loops, "min_loops")
        if loops != "auto":  # the companions of "auto" mean nothing here, and are otherwise ignored
            return loops, None
        budget = cfg.max_loops if body.max_loops is None else body.max_loops
        min_loops = min(budget, self.options.adaptive_min_loops) if body.min_loops is None else body.min_loops
        if min_loops > budget:
            raise APIError(400, f"min_loops must be in 1..{budget} (max_loops), got {min_loops}", "min_loops")
        if cfg.kv_budget:
            raise APIError(400, "loops \"auto\" needs one K/V slot per loop; this model shares slots (kv_budget "
                           f"{cfg.kv_budget})", "loops")
        tolerance = self.options.adaptive_tolerance if body.tolerance is None else body.tolerance
        return budget, Adaptive(tolerance, min_loops)

    def speculation(self, asked: Any, loops: int, adaptive: Adaptive | None = None) -> SpecRequest | None:
        """A request's `speculative` field (or the server's default) as the engine's SpecRequest, or None (plain).
        `auto` quietly stays plain where drafting is impossible; an explicit draft that cannot run is a 400."""
        asked = self.options.speculative if asked is None else asked
        if asked == "off" or (adaptive is not None and asked == "auto"):
            return None
        if adaptive is not None:
            raise APIError(400, "speculative decoding and loops \"auto\" do not combine: a draft needs to know "
                           "the depth of the token it stands in for", "speculative")
        possible = self.options.spec_tokens > 0 and self.config.kv_budget == 0 and loops > 1
        if asked == "auto":
            return SpecRequest(auto=True) if possible else None
        if self.options.spec_tokens == 0:
            raise APIError(400, "self-speculative decoding is off on this server (--spec-tokens 0)", "speculative")
        if self.config.kv_budget:
            raise APIError(400, "self-speculative decoding needs one K/V slot per loop; this model shares slots "
                           f"(kv_budget {self.config.kv_budget})", "speculative")
        if not 1 <= asked.draft_loops < loops:
            raise APIError(400, f"speculative.draft_loops must be in 1..{loops - 1} (below loops, {loops}), got "
                           f"{asked.draft_loops}", "speculative")
        # at most the server's --spec-tokens: a client cannot know the server's lanes, so more is not an error
        return SpecRequest(draft_loops=asked.draft_loops, tokens=min(asked.tokens or 1 << 30, self.options.spec_tokens))

    def check_limits(self, n_prompt: int, max_tokens: int) -> None:
        cfg = self.config
        if n_prompt < 1:
            raise APIError(400, "prompt is empty: give at least one token of text", "prompt")
        if n_prompt >= cfg.block_size:
            raise APIError(400, f"prompt ({n_prompt} tokens) fills the context of {cfg.block_size} tokens; "
                           "shorten it", "prompt", code="context_length_exceeded")
        if n_prompt + max_tokens > cfg.block_size:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{cfg.block_size} tokens; shorten the prompt or lower max_tokens", "max_tokens",
                           code="context_length_exceeded")

    @staticmethod
    def dumps(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def serving_config(cfg: Any, loop_cap: int, max_context: int) -> Any:
    """The checkpoint's config with the server's caps (0: keep the checkpoint's); the model and the KV cache
    read their limits from it, so a smaller cap is a smaller cache."""
    if loop_cap and not cfg.max_loops <= loop_cap <= cfg.loop_cap:
        raise ValueError(f"--loop-cap must be in {cfg.max_loops}..{cfg.loop_cap} for this checkpoint (its trained "
                         f"loops .. its loop_cap), got {loop_cap}")
    if max_context and not 2 <= max_context <= cfg.block_size:
        raise ValueError(f"--max-context must be in 2..{cfg.block_size} for this checkpoint, got {max_context}")
    return dataclasses.replace(cfg, loop_cap=loop_cap or cfg.loop_cap, block_size=max_context or cfg.block_size)


def create_app(loader: Callable[[], Loaded], options: ServerOptions | None = None) -> FastAPI:
    """An app that loads the model in a background thread at startup and stops its engine at shutdown."""
    state = ServerState(loader, options or ServerOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="loopgpt-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

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

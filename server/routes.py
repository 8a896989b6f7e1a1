"""Generation routes: `POST /generate` (our SSE/JSON shape) and `POST /v1/completions` (OpenAI's).

Both validate everything before the first byte, submit one engine Request, then read that request's
own asyncio queue; a stream whose client goes away aborts its request in the `finally`.

    curl -N 127.0.0.1:8000/generate?loops=6 -H 'Content-Type: application/json' \
         -d '{"prompt": "Once upon a time", "max_tokens": 32, "stream": true}'
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from loopgpt.model import SamplingParams
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from .engine import FinishEvent, NotAccepting, QueueFull, Request, TokenEvent
from .openapi import error_responses, generation_doc, stream_content
from .schemas import (
    APIError,
    CompletionBody,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    ErrorResponse,
    GenerateBody,
    GenerateFinalEvent,
    GenerateResponse,
    GenerateTokenEvent,
    parse_body,
    query_loops,
    read_json,
)

router = APIRouter()
RETRY_AFTER_S = "1"


async def submit(http: HTTPRequest, endpoint: str, body_cls: type) -> tuple[Any, Request, asyncio.Queue, Any]:
    """Validate, build and submit the engine request; counts every outcome in requests_total."""
    state = http.app.state.loopgpt
    loops: Any = None
    try:
        state.authorize(http)
        if state.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", code="not_ready")
        loops = query_loops(http.query_params.getlist("loops"))  # first, so that later errors carry its label
        http.state.loops = loops  # for the 500 counter, should anything below fail unexpectedly
        body = parse_body(body_cls, await read_json(http, state.max_body))
        if body.loops is not None:  # checked even when the query wins: a bad value is never silently ignored
            state.check_loops(body.loops)
        loops = loops if loops is not None else body.loops if body.loops is not None else state.config.max_loops
        http.state.loops = loops
        state.check_model(getattr(body, "model", None))
        stop = body.stop_list()
        prompt_ids = state.encode_prompt(body.prompt_text_or_ids() if endpoint == "completions" else body.prompt)
        max_tokens = body.tokens_to_generate(len(prompt_ids), state.config.block_size)
        budget, adaptive = state.adaptive(body, loops)
        state.check_limits(len(prompt_ids), max_tokens, budget)
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        speculative = state.speculation(body.speculative, budget, adaptive)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        req = Request(prompt_ids, budget, max_tokens, params, seed=body.seed, stop=stop, speculative=speculative,
                      adaptive=adaptive, endpoint=endpoint,
                      emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            state.engine.submit(req)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from e
        except NotAccepting as e:
            raise APIError(503, str(e), code="not_ready") from e
    except APIError as e:
        if state.metrics is not None:
            state.metrics.request(endpoint, loops, e.status)
            http.state.counted = True
        raise
    if state.metrics is not None:
        state.metrics.request(endpoint, loops, 200)
        http.state.counted = True
    return state, req, queue, body


async def events(state: Any, req: Request, queue: asyncio.Queue, http: HTTPRequest | None) -> AsyncIterator[Any]:
    """The request's events up to its FinishEvent; aborts it if the consumer stops early.

    With `http` (non-streaming), polls for a disconnected client; SSE responses detect it themselves.
    """
    try:
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), 1.0)
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    return
                continue
            yield ev
            if isinstance(ev, FinishEvent):
                return
    finally:
        if not req.done:
            state.engine.abort(req)


def shown_loops(req: Request) -> int | str:
    """The `loops` a response reports: the request's, "auto" for an adaptive one."""
    return "auto" if req.adaptive is not None else req.loops


def summary(ev: FinishEvent, loops: int | str) -> dict:
    return {
        "finish_reason": ev.finish_reason,
        "usage": {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                  "total_tokens": ev.prompt_tokens + ev.completion_tokens},
        "loops": loops,
        "loops_per_token": ev.loops_per_token,
        "timing": {"ttft_s": ev.ttft_s, "e2e_s": ev.e2e_s, "tokens_per_s": ev.tokens_per_s},
        "quality": {"prompt_nll": ev.prompt_nll, "token_nll": ev.token_nll},
    }


async def collect(state, req, queue, http: HTTPRequest) -> tuple[str, FinishEvent]:
    """A non-streaming response's whole text and its final event."""
    text, final = [], None
    async for ev in events(state, req, queue, http):
        text.append(ev.text)
        final = ev if isinstance(ev, FinishEvent) else None
    if final is None:  # the client left; nobody reads this
        raise APIError(499, "client disconnected")
    if final.finish_reason == "error":
        raise generation_failed(final)
    return "".join(text), final


def generation_failed(ev: FinishEvent) -> APIError:
    """This request alone failed inside the engine (its batch mates went on): a 500 in OpenAI's shape."""
    return APIError(500, ev.error or "generation failed", code="generation_failed")


def error_event(state, ev: FinishEvent) -> dict:
    """The SSE event that ends a stream whose request failed in the engine (sent before [DONE])."""
    return {"data": state.dumps(generation_failed(ev).body())}


TOKEN_EVENTS = ("with stream: one event per token `{text, token_id, index}`, a final event `{text, finish_reason, "
                "usage, loops, timing, quality}`, then `[DONE]`; a request that fails alone in the engine ends "
                "with an error event `{error}` instead of the final event")
CHUNK_EVENTS = ("with stream: one `text_completion` chunk per token, the last with finish_reason (and, with "
                "stream_options.include_usage, a chunk with usage and no choices), then `[DONE]`; a request that "
                "fails alone in the engine ends with an error event `{error}` before `[DONE]`")
GENERATION_ERRORS = (400, 401, 413, 415, 429, 500, 503)


@router.post("/generate", summary="Generate text at a chosen depth (our shape)",
             openapi_extra=generation_doc(GenerateBody),
             responses={200: {"model": GenerateResponse, "description": "the completion (JSON, or SSE with stream)",
                              "content": stream_content(TOKEN_EVENTS, GenerateTokenEvent, GenerateFinalEvent,
                                                        ErrorResponse)},
                        **error_responses(*GENERATION_ERRORS)})
async def generate(http: HTTPRequest):
    state, req, queue, body = await submit(http, "generate", GenerateBody)
    if body.stream:
        async def stream() -> AsyncIterator[dict]:
            async for ev in events(state, req, queue, None):
                if isinstance(ev, TokenEvent):
                    yield {"data": state.dumps({"text": ev.text, "token_id": ev.token_id, "index": ev.index})}
                elif ev.finish_reason == "error":
                    yield error_event(state, ev)
                else:
                    yield {"data": state.dumps({"text": ev.text, **summary(ev, shown_loops(req))})}
            yield {"data": "[DONE]"}
        return EventSourceResponse(stream())
    text, final = await collect(state, req, queue, http)
    return JSONResponse(GenerateResponse(text=text, model=state.name, **summary(final, shown_loops(req))).model_dump())


@router.post("/v1/completions", summary="OpenAI-compatible completions (`loops` as an extra field)",
             openapi_extra=generation_doc(CompletionBody),
             responses={200: {"model": CompletionResponse, "description": "the completion (JSON, or SSE with stream)",
                              "content": stream_content(CHUNK_EVENTS, CompletionChunk, ErrorResponse)},
                        **error_responses(*GENERATION_ERRORS, 404)})
async def completions(http: HTTPRequest):
    state, req, queue, body = await submit(http, "completions", CompletionBody)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.name}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    if body.stream:
        async def stream() -> AsyncIterator[dict]:
            async for ev in events(state, req, queue, None):
                if isinstance(ev, FinishEvent) and ev.finish_reason == "error":
                    yield error_event(state, ev)
                    break
                choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": None}
                extra: dict = {"usage": None} if include_usage else {}
                if isinstance(ev, FinishEvent):
                    s = summary(ev, shown_loops(req))
                    choice["finish_reason"] = ev.finish_reason
                    extra.update(loops=s["loops"], loops_per_token=s["loops_per_token"], timing=s["timing"],
                                 quality=s["quality"])
                yield {"data": state.dumps({**head, "choices": [choice], **extra})}
                if isinstance(ev, FinishEvent) and include_usage:
                    usage = summary(ev, shown_loops(req))["usage"]
                    yield {"data": state.dumps({**head, "choices": [], "usage": usage})}
            yield {"data": "[DONE]"}
        return EventSourceResponse(stream())
    text, final = await collect(state, req, queue, http)
    s = summary(final, shown_loops(req))
    choice = CompletionChoice(index=0, text=text, finish_reason=final.finish_reason)
    return JSONResponse(CompletionResponse(**head, choices=[choice], usage=s["usage"], loops=s["loops"],
                                           loops_per_token=s["loops_per_token"],
                                           timing=s["timing"], quality=s["quality"]).model_dump())

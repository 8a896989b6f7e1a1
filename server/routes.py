"""Generation routes: `POST /generate` (our SSE/JSON shape) and `POST /v1/completions` (OpenAI's); the chat route
(`server/chat_routes.py`) submits through `submit` here too.

Each validates everything before the first byte, submits its engine requests (one per prompt and choice,
`server/choices.py`), then reads its own asyncio queue; a stream whose client goes away aborts them in a `finally`.

    curl -N 127.0.0.1:8000/generate?loops=6 -H 'Content-Type: application/json' \
         -d '{"prompt": "Once upon a time", "max_tokens": 32, "stream": true}'
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from loopgpt.model import SamplingParams
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from . import choices as ch
from .engine import FinishEvent, NotAccepting, QueueFull, TokenEvent
from .logprobs import CompletionLogprobs, PromptScores
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


@dataclass
class Submission:
    state: Any
    body: Any
    loops: int
    choices: list[ch.Choice]
    queue: asyncio.Queue

    @property
    def req(self) -> Any:  # the first choice's request (the only one of /generate)
        return self.choices[0].req


Encoder = Callable[[Any, Any], list[list[int]]]  # (state, body) -> the token ids of each prompt; runs in a thread


async def submit(http: HTTPRequest, endpoint: str, body_cls: type, encode: Encoder,
                 more_stops: list[str] | None = None) -> Submission:
    """Validate, build and submit the engine requests; counts every outcome in requests_total. `more_stops` are
    added to the body's stop strings (the chat template's end of turn)."""
    state = http.app.state.loopgpt
    loops: Any = None
    try:
        state.ready(http)
        loops = query_loops(http.query_params.getlist("loops"))  # first, so that later errors carry its label
        http.state.loops = loops  # for the 500 counter, should anything below fail unexpectedly
        body = parse_body(body_cls, await read_json(http, state.max_body))
        if body.loops is not None:  # checked even when the query wins: a bad value is never silently ignored
            state.check_loops(body.loops)
        if body.max_loops is not None:
            state.check_loops(body.max_loops, "max_loops")
        named = state.check_model(getattr(body, "model", None))
        loops = body.resolve_loops(loops, state.config.max_loops, named)  # an int, or "auto"
        http.state.loops = loops
        budget, adaptive = state.adaptive(body, loops)  # with "auto", the most loops a token may run
        stop = body.stop_list()
        stop += [s for s in more_stops or [] if s not in stop]
        prompts = await state.offload(encode, state, body)  # templating and BPE: off the event loop
        state.check_choices(len(prompts), body)
        max_tokens = body.tokens_to_generate(max(len(p) for p in prompts), state.config.block_size)
        state.check_loops(budget)
        for ids in prompts:
            state.check_limits(len(ids), max_tokens)
        body.check_tokens(max_tokens)
        state.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        speculative = state.speculation(body.speculative, budget, adaptive)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(i: int) -> Callable[[Any], None]:
            return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        choices = ch.build(prompts, body.candidates(), budget, max_tokens, params, body.seed, emit, stop=stop,
                           speculative=speculative, adaptive=adaptive, endpoint=endpoint, **body.engine_fields())
        try:
            state.engine.submit_all(ch.leaders(choices))
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
    return Submission(state, body, loops, choices, queue)


def summary(ev: FinishEvent, loops: int | str) -> dict:
    """The final event's fields; `loops` as the request gave it (an int, or "auto")."""
    return {
        "finish_reason": ev.finish_reason,
        "usage": {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                  "total_tokens": ev.prompt_tokens + ev.completion_tokens},
        "loops": loops,
        "loops_per_token": ev.loops_per_token,
        "timing": {"ttft_s": ev.ttft_s, "e2e_s": ev.e2e_s, "tokens_per_s": ev.tokens_per_s},
        "quality": {"prompt_nll": ev.prompt_nll, "token_nll": ev.token_nll},
    }


async def collect(sub: Submission, http: HTTPRequest) -> list[ch.Choice]:
    """Every choice of a non-streaming response, finished; a 500 if one of them failed in the engine."""
    async for _ in ch.events(sub.state.engine, sub.choices, sub.queue, http):
        pass
    if any(c.final is None for c in sub.choices):  # the client left; nobody reads this
        raise APIError(499, "client disconnected")
    failed = next((c.final for c in sub.choices if c.final.finish_reason == "error"), None)
    if failed is not None:
        raise generation_failed(failed)
    return sub.choices


def generation_failed(ev: FinishEvent) -> APIError:
    """This request alone failed inside the engine (its batch mates went on): a 500 in OpenAI's shape."""
    return APIError(500, ev.error or "generation failed", code="generation_failed")


def error_event(state, ev: FinishEvent) -> dict:
    """The SSE event that ends a stream whose request failed in the engine (sent before [DONE])."""
    return {"data": state.dumps(generation_failed(ev).body())}


TOKEN_EVENTS = ("with stream: one event per token `{text, token_id, index}`, a final event `{text, finish_reason, "
                "usage, loops, timing, quality}`, then `[DONE]`; a request that fails alone in the engine ends "
                "with an error event `{error}` instead of the final event")
CHUNK_EVENTS = ("with stream: one `text_completion` chunk per token and choice (`index`; with echo, the prompt "
                "first), the last of a choice with finish_reason (and, with stream_options.include_usage, a chunk "
                "with usage and no choices at the end), then `[DONE]`; a request that fails alone in the engine ends "
                "with an error event `{error}` before `[DONE]`")
GENERATION_ERRORS = (400, 401, 413, 415, 429, 500, 503)


def encode_generate(state: Any, body: GenerateBody) -> list[list[int]]:
    return [state.encode_prompt(body.prompt)]


@router.post("/generate", summary="Generate text at a chosen depth (our shape)",
             openapi_extra=generation_doc(GenerateBody),
             responses={200: {"model": GenerateResponse, "description": "the completion (JSON, or SSE with stream)",
                              "content": stream_content(TOKEN_EVENTS, GenerateTokenEvent, GenerateFinalEvent,
                                                        ErrorResponse)},
                        **error_responses(*GENERATION_ERRORS)})
async def generate(http: HTTPRequest):
    sub = await submit(http, "generate", GenerateBody, encode_generate)
    state, loops = sub.state, sub.loops
    if sub.body.stream:
        async def stream() -> AsyncIterator[dict]:
            async for _, ev in ch.events(state.engine, sub.choices, sub.queue):
                if isinstance(ev, TokenEvent):
                    yield {"data": state.dumps({"text": ev.text, "token_id": ev.token_id, "index": ev.index})}
                elif ev.finish_reason == "error":
                    yield error_event(state, ev)
                else:
                    yield {"data": state.dumps({"text": ev.text, **summary(ev, loops)})}
            yield {"data": "[DONE]"}
        return EventSourceResponse(stream())
    choice = (await collect(sub, http))[0]
    out = GenerateResponse(text=choice.text, model=state.name, **summary(choice.final, loops))
    return JSONResponse(out.model_dump())


def encode_completions(state: Any, body: CompletionBody) -> list[list[int]]:
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is an empty list: give at least one prompt", "prompt")
    return [state.encode_prompt(p, special=True) for p in prompts]


def response_head(state: Any, kind: str, prefix: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": state.name}


@router.post("/v1/completions", summary="OpenAI-compatible completions (`loops` as an extra field)",
             openapi_extra=generation_doc(CompletionBody),
             responses={200: {"model": CompletionResponse, "description": "the completion (JSON, or SSE with stream)",
                              "content": stream_content(CHUNK_EVENTS, CompletionChunk, ErrorResponse)},
                        **error_responses(*GENERATION_ERRORS, 404)})
async def completions(http: HTTPRequest):
    sub = await submit(http, "completions", CompletionBody, encode_completions)
    head = response_head(sub.state, "text_completion", "cmpl")
    if sub.body.stream:
        return EventSourceResponse(completion_stream(sub, head))
    body, tokenizer = sub.body, sub.state.loaded.tokenizer
    out = []
    for index, c in enumerate(ch.best(await collect(sub, http), body.n)):
        prompt_text = tokenizer.decode(c.req.prompt_ids) if body.echo else ""
        logprobs = None if body.logprobs is None else completion_logprobs(tokenizer, c, body)
        out.append(CompletionChoice(index=index, text=prompt_text + c.text, finish_reason=c.final.finish_reason,
                                    logprobs=logprobs))
    return JSONResponse(CompletionResponse(**head, choices=out, **ch.totals(sub.choices, sub.loops)).model_dump())


def completion_logprobs(tokenizer: Any, c: ch.Choice, body: CompletionBody) -> dict:
    lp = CompletionLogprobs(tokenizer)
    if body.echo:
        lp.prompt(c.req.prompt_ids, c.scores or PromptScores([], []))
    for t in c.tokens:
        lp.add(t.token_id, -t.nll, t.top)
    return lp.whole


async def completion_stream(sub: Submission, head: dict) -> AsyncIterator[dict]:
    """One chunk per event of every choice (its number is its index), the prompt first with echo."""
    state, body, tokenizer = sub.state, sub.body, sub.state.loaded.tokenizer
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra: dict = {"usage": None} if include_usage else {}
    logs = [CompletionLogprobs(tokenizer) for _ in sub.choices]
    echoed: set[int] = set()
    async for i, ev in ch.events(state.engine, sub.choices, sub.queue):
        if isinstance(ev, FinishEvent) and ev.finish_reason == "error":
            yield error_event(state, ev)
            break
        c = sub.choices[i]
        if body.echo and i not in echoed:  # the prompt comes first (with its logprobs, when they were asked)
            echoed.add(i)
            scores = ev if isinstance(ev, PromptScores) else PromptScores([], [])
            part = logs[i].prompt(c.req.prompt_ids, scores) if body.logprobs is not None else None
            yield chunk(state, head, extra, i, tokenizer.decode(c.req.prompt_ids), part)
        if isinstance(ev, PromptScores):
            continue
        choice_extra = dict(extra)
        if isinstance(ev, TokenEvent):
            part = logs[i].add(ev.token_id, -ev.nll, ev.top) if body.logprobs is not None else None
            yield chunk(state, head, extra, i, ev.text, part)
            continue
        s = summary(ev, sub.loops)
        choice_extra.update(loops=sub.loops, loops_per_token=s["loops_per_token"], timing=s["timing"],
                            quality=s["quality"])
        yield chunk(state, head, choice_extra, i, ev.text, None, ev.finish_reason)
    else:
        if include_usage:
            yield {"data": state.dumps({**head, "choices": [], "usage": ch.usage(sub.choices)})}
    yield {"data": "[DONE]"}


def chunk(state: Any, head: dict, extra: dict, index: int, text: str, logprobs: dict | None,
          finish_reason: str | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"data": state.dumps({**head, "choices": [choice], **extra})}

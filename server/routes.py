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
from typing import Any, Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from . import choices as ch
from .admission import query_loops
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
    OpenAIChunk,
    parse_body,
    read_json,
)

router = APIRouter()
RETRY_AFTER_S = "1"
DEPTH_FIELDS = ("loops", "loops_per_token", "timing", "quality")  # of a stream's final chunk, from `summary`


@dataclass
class Submission:
    state: Any
    body: Any
    loops: int | str  # as responses give it back: the depth, or "auto"
    choices: list[ch.Choice]
    queue: asyncio.Queue

    @property
    def req(self) -> Any:  # the first choice's request (the only one of /generate)
        return self.choices[0].req


Encoder = Callable[[Any, Any], list[list[int]]]  # (state, body) -> the token ids of each prompt; runs in a thread


async def submit(http: HTTPRequest, endpoint: str, body_cls: type, encode: Encoder,
                 more_stops: list[str] | None = None) -> Submission:
    """Read the request, admit it (server/admission.py) and submit its engine requests; counts every outcome in
    requests_total. `more_stops` are added to the body's stop strings (the chat template's end of turn)."""
    state = http.app.state.loopgpt
    loops: Any = None
    try:
        state.ready(http)
        loops = query_loops(http.query_params.getlist("loops"))  # first, so that later errors carry its label
        http.state.loops = loops  # for the 500 counter, should anything below fail unexpectedly
        body = parse_body(body_cls, await read_json(http, state.max_body))
        depth = state.admission.depth(body, loops)
        loops = http.state.loops = depth.label
        prompts = await state.offload(encode, state, body)  # templating and BPE: off the event loop
        admitted = state.admission.admit(body, depth, prompts, more_stops or [])
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(i: int) -> Callable[[Any], None]:
            return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        choices = ch.build(admitted, emit, endpoint)
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
                    out = GenerateTokenEvent(text=ev.text, token_id=ev.token_id, index=ev.index)
                    yield {"data": state.dumps(out.model_dump())}
                elif ev.finish_reason == "error":
                    yield error_event(state, ev)
                else:
                    final = GenerateFinalEvent(text=ev.text, **summary(ev, loops))
                    yield {"data": state.dumps(final.model_dump(exclude_unset=True))}  # the keys `summary` has
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
        return EventSourceResponse(openai_stream(sub, head, CompletionParts(sub)))
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


class StreamParts(Protocol):
    """What one route's OpenAI stream sends (see `openai_stream`): CompletionParts here, chat_routes.ChatParts."""

    chunk: type[OpenAIChunk]  # the response model every chunk is built through

    def opening(self) -> list[Any]: ...  # the choices sent before any event

    def parts(self, i: int, ev: Any) -> list[Any]: ...  # the choices of choice i's event `ev`, in order


class CompletionParts:
    """The choices of a /v1/completions stream, per engine event: with echo, the prompt first (with its logprobs,
    when they were asked), then one per token; the one of the FinishEvent carries finish_reason."""

    chunk = CompletionChunk

    def __init__(self, sub: Submission):
        self.sub, self.tokenizer = sub, sub.state.loaded.tokenizer
        self.logs = [CompletionLogprobs(self.tokenizer) for _ in sub.choices]
        self.echoed: set[int] = set()

    def opening(self) -> list[CompletionChoice]:
        return []

    def parts(self, i: int, ev: Any) -> list[CompletionChoice]:
        body, req, out = self.sub.body, self.sub.choices[i].req, []
        if body.echo and i not in self.echoed:  # the prompt's scores, when asked for, are its first event
            self.echoed.add(i)
            scores = ev if isinstance(ev, PromptScores) else PromptScores([], [])
            part = self.logs[i].prompt(req.prompt_ids, scores) if body.logprobs is not None else None
            out.append(CompletionChoice(index=i, text=self.tokenizer.decode(req.prompt_ids), logprobs=part,
                                        finish_reason=None))
        if isinstance(ev, TokenEvent):
            part = self.logs[i].add(ev.token_id, -ev.nll, ev.top) if body.logprobs is not None else None
            out.append(CompletionChoice(index=i, text=ev.text, logprobs=part, finish_reason=None))
        elif isinstance(ev, FinishEvent):
            out.append(CompletionChoice(index=i, text=ev.text, logprobs=None, finish_reason=ev.finish_reason))
        return out


async def openai_stream(sub: Submission, head: dict, shape: StreamParts) -> AsyncIterator[dict]:
    """OpenAI's event stream, for completions and chat alike, each chunk built through `shape.chunk`: the opening
    choices, then the parts of every event; the chunk of a FinishEvent's last part carries the depth fields. A
    usage chunk closes the stream with stream_options.include_usage; a request that failed in the engine ends it
    with an error event instead."""
    state, options = sub.state, sub.body.stream_options
    extra: dict = {"usage": None} if options is not None and options.include_usage else {}

    def event(**fields: Any) -> dict:  # the fields as given: a chunk has no key its route did not set
        return {"data": state.dumps(shape.chunk(**head, **fields).model_dump(exclude_unset=True))}

    for choice in shape.opening():
        yield event(choices=[choice], **extra)
    async for i, ev in ch.events(state.engine, sub.choices, sub.queue):
        if isinstance(ev, FinishEvent) and ev.finish_reason == "error":
            yield error_event(state, ev)
            break
        parts = shape.parts(i, ev)
        for n, choice in enumerate(parts):
            last = isinstance(ev, FinishEvent) and n == len(parts) - 1
            depth = {k: v for k, v in summary(ev, sub.loops).items() if k in DEPTH_FIELDS} if last else {}
            yield event(choices=[choice], **extra, **depth)
    else:
        if extra:
            yield event(choices=[], usage=ch.usage(sub.choices))
    yield {"data": "[DONE]"}

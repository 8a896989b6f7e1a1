"""`POST /v1/chat/completions` (OpenAI's chat shapes, streaming and not) and the tokenizer routes that vLLM serves
and lm-eval's remote tokenizer reads: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

    curl -N 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 32, "stream": true}'
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from loopgpt.model.tokenizer import EOT
from sse_starlette import EventSourceResponse
from starlette.requests import Request as HTTPRequest

from . import choices as ch
from .chat import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatChunk,
    ChatResponse,
    DetokenizeBody,
    DetokenizeResponse,
    TokenizeBody,
    TokenizeResponse,
    TokenizerInfo,
)
from .engine import FinishEvent, TokenEvent
from .logprobs import chat_entry
from .openapi import error_responses, generation_doc, json_body_doc, stream_content
from .routes import GENERATION_ERRORS, Submission, collect, error_event, response_head, submit, summary
from .schemas import APIError, ErrorResponse, parse_body, read_json

router = APIRouter()
CHAT_EVENTS = ("with stream: per choice (`index`) a first `chat.completion.chunk` with the assistant role, one per "
               "token with its text (and logprobs), the last with finish_reason (and, with "
               "stream_options.include_usage, a chunk with usage and no choices at the end), then `[DONE]`; a request "
               "that fails alone in the engine ends with an error event `{error}` before `[DONE]`")


def encode_chat(state: Any, body: ChatBody) -> list[list[int]]:
    text = state.chat.render([m.plain() for m in body.messages])
    return [state.encode_prompt(text, special=True)]


@router.post("/v1/chat/completions", summary="OpenAI-compatible chat (`loops` as an extra field)",
             openapi_extra=generation_doc(ChatBody),
             responses={200: {"model": ChatResponse, "description": "the reply (JSON, or SSE with stream)",
                              "content": stream_content(CHAT_EVENTS, ChatChunk, ErrorResponse)},
                        **error_responses(*GENERATION_ERRORS, 404)})
async def chat_completions(http: HTTPRequest):
    template = http.app.state.loopgpt.chat
    # the template's own end of turn (the default's "\nUser:") stops generation too
    sub = await submit(http, "chat", ChatBody, encode_chat, template.stops if template else [])
    head = response_head(sub.state, "chat.completion", "chatcmpl")
    if sub.body.stream:
        return EventSourceResponse(chat_stream(sub, {**head, "object": "chat.completion.chunk"}))
    tokenizer = sub.state.loaded.tokenizer
    out = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.final.finish_reason,
                      logprobs={"content": [chat_entry(tokenizer, t.token_id, -t.nll, t.top) for t in c.tokens]}
                      if sub.body.logprobs else None)
           for i, c in enumerate(await collect(sub, http))]
    return JSONResponse(ChatResponse(**head, choices=out, **ch.totals(sub.choices, sub.loops)).model_dump())


async def chat_stream(sub: Submission, head: dict) -> AsyncIterator[dict]:
    state, body, tokenizer = sub.state, sub.body, sub.state.loaded.tokenizer
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    extra: dict = {"usage": None} if include_usage else {}

    def event(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None, **more) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"data": state.dumps({**head, "choices": [choice], **extra, **more})}

    for i in range(len(sub.choices)):
        yield event(i, {"role": "assistant", "content": ""})
    async for i, ev in ch.events(state.engine, sub.choices, sub.queue):
        if isinstance(ev, FinishEvent) and ev.finish_reason == "error":
            yield error_event(state, ev)
            break
        if isinstance(ev, TokenEvent):
            logprobs = {"content": [chat_entry(tokenizer, ev.token_id, -ev.nll, ev.top)]} if body.logprobs else None
            yield event(i, {"content": ev.text}, logprobs)
        elif isinstance(ev, FinishEvent):
            s = summary(ev, sub.loops)
            yield event(i, {"content": ev.text} if ev.text else {}, None, ev.finish_reason, loops=sub.loops,
                        loops_per_token=s["loops_per_token"], timing=s["timing"], quality=s["quality"])
    else:
        if include_usage:
            yield {"data": state.dumps({**head, "choices": [], "usage": ch.usage(sub.choices)})}
    yield {"data": "[DONE]"}


# ---- tokenizer routes ----

async def tokenizer_body(http: HTTPRequest, model: type) -> tuple[Any, Any]:
    state = http.app.state.loopgpt
    state.ready(http)
    body = parse_body(model, await read_json(http, state.max_body))
    state.check_model(body.model)
    return state, body


@router.post("/tokenize", summary="Token ids of a prompt, as /v1/completions (or chat messages, as the chat route) "
             "reads it", openapi_extra=json_body_doc(TokenizeBody),
             responses={200: {"model": TokenizeResponse}, **error_responses(400, 401, 404, 413, 415, 503)})
async def tokenize(http: HTTPRequest):
    state, body = await tokenizer_body(http, TokenizeBody)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", "prompt")
    return await state.offload(tokenize_response, state, body)


def tokenize_response(state: Any, body: TokenizeBody) -> Response:
    """In an offload thread: templating, BPE and the JSON of the ids (a 1 MB prompt has ~250,000)."""
    if body.messages is not None:
        text = state.chat.render([m.plain() for m in body.messages], body.add_generation_prompt)
    else:
        text = body.prompt
    ids = state.encode_prompt(text, special=True)
    out = TokenizeResponse(count=len(ids), max_model_len=state.config.block_size, tokens=ids)
    # pydantic's serializer holds the GIL half as long as json.dumps of the same ids, so the event loop waits less
    return Response(out.model_dump_json(), media_type="application/json")


@router.post("/detokenize", summary="The text of token ids", openapi_extra=json_body_doc(DetokenizeBody),
             responses={200: {"model": DetokenizeResponse}, **error_responses(400, 401, 404, 413, 415, 503)})
async def detokenize(http: HTTPRequest):
    state, body = await tokenizer_body(http, DetokenizeBody)
    return await state.offload(detokenize_response, state, body)


def detokenize_response(state: Any, body: DetokenizeBody) -> JSONResponse:
    state.check_token_ids(body.tokens, "tokens")
    return JSONResponse(DetokenizeResponse(prompt=state.loaded.tokenizer.decode(body.tokens)).model_dump())


@router.get("/tokenizer_info", summary="The tokenizer's special tokens and chat template (lm-eval's remote "
            "tokenizer)", responses={200: {"model": TokenizerInfo}, **error_responses(401, 503)})
async def tokenizer_info(http: HTTPRequest):
    state = http.app.state.loopgpt
    state.ready(http)
    info = TokenizerInfo(tokenizer_class=f"tiktoken:{state.loaded.tokenizer.name}", eos_token=EOT,
                         chat_template=state.chat.source, model_max_length=state.config.block_size)
    return JSONResponse(info.model_dump())

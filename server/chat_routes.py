"""`POST /v1/chat/completions` (OpenAI's chat shapes, streaming and not) and the tokenizer routes that vLLM serves
and lm-eval's remote tokenizer reads: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

    curl -N 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 32, "stream": true}'
"""

from __future__ import annotations

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
    ChatChunkChoice,
    ChatDelta,
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
from .routes import GENERATION_ERRORS, Submission, collect, openai_stream, response_head, submit
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
        return EventSourceResponse(openai_stream(sub, {**head, "object": "chat.completion.chunk"}, ChatParts(sub)))
    tokenizer = sub.state.loaded.tokenizer
    out = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.final.finish_reason,
                      logprobs={"content": [chat_entry(tokenizer, t.token_id, -t.nll, t.top) for t in c.tokens]}
                      if sub.body.logprobs else None)
           for i, c in enumerate(await collect(sub, http))]
    return JSONResponse(ChatResponse(**head, choices=out, **ch.totals(sub.choices, sub.loops)).model_dump())


class ChatParts:
    """The choices of a chat stream (see routes.openai_stream): first the assistant's role for every choice, then
    one per token (with its logprobs, when asked), the one of the FinishEvent with finish_reason."""

    chunk = ChatChunk

    def __init__(self, sub: Submission):
        self.sub, self.tokenizer = sub, sub.state.loaded.tokenizer

    def opening(self) -> list[ChatChunkChoice]:
        return [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                finish_reason=None) for i in range(len(self.sub.choices))]

    def parts(self, i: int, ev: Any) -> list[ChatChunkChoice]:
        if isinstance(ev, TokenEvent):
            logprobs = ({"content": [chat_entry(self.tokenizer, ev.token_id, -ev.nll, ev.top)]}
                        if self.sub.body.logprobs else None)
            return [ChatChunkChoice(index=i, delta=ChatDelta(content=ev.text), logprobs=logprobs, finish_reason=None)]
        if isinstance(ev, FinishEvent):
            delta = ChatDelta(content=ev.text) if ev.text else ChatDelta()
            return [ChatChunkChoice(index=i, delta=delta, logprobs=None, finish_reason=ev.finish_reason)]
        return []


# ---- tokenizer routes ----

async def tokenizer_body(http: HTTPRequest, model: type) -> tuple[Any, Any]:
    state = http.app.state.loopgpt
    state.ready(http)
    body = parse_body(model, await read_json(http, state.max_body))
    state.admission.model(body.model)
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
    state.admission.check_token_ids(body.tokens, "tokens")
    return JSONResponse(DetokenizeResponse(prompt=state.loaded.tokenizer.decode(body.tokens)).model_dump())


@router.get("/tokenizer_info", summary="The tokenizer's special tokens and chat template (lm-eval's remote "
            "tokenizer)", responses={200: {"model": TokenizerInfo}, **error_responses(401, 503)})
async def tokenizer_info(http: HTTPRequest):
    state = http.app.state.loopgpt
    state.ready(http)
    info = TokenizerInfo(tokenizer_class=f"tiktoken:{state.loaded.tokenizer.name}", eos_token=EOT,
                         chat_template=state.chat.source, model_max_length=state.config.block_size)
    return JSONResponse(info.model_dump())

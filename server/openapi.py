"""The OpenAPI document (`GET /openapi.json`) and its offline viewer (`GET /docs`).

The generation routes read their body themselves (so that 415, 413 and 400 come before any parsing), so
FastAPI cannot see their request models: this module adds them to the document from the same pydantic
models the routes validate with, and states the live limits of the loaded checkpoint (loops range,
context, vocabulary), so a client or a fuzzer reads the real contract.

    curl -s 127.0.0.1:8000/openapi.json | python -m json.tool | head
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from .schemas import (
    CompletionBody,
    CompletionChunk,
    ErrorResponse,
    GenerateBody,
    GenerateFinalEvent,
    GenerateTokenEvent,
)

REF = "#/components/schemas/{model}"
DESCRIPTION = (
    "Serve loop-residual GPT models: every request picks its own depth (`loops`). Errors are OpenAI-shaped "
    "(`{\"error\": {message, type, param, code}}`) and come before the first byte of a stream. "
    "Streaming responses are Server-Sent Events: `data: {json}` per token, a final event with "
    "`finish_reason`, `usage`, `timing`, then `data: [DONE]`."
)

ERRORS = {
    400: "invalid input: the message names the field (`param`); `context_length_exceeded` when prompt + max_tokens "
         "does not fit the context",
    401: "missing or wrong API key (only when the server has one)",
    404: "the `model` is none of the served model's names (`model_not_found`)",
    413: "body larger than --max-body",
    415: "Content-Type is not application/json",
    429: "queue full: retry after `Retry-After` seconds",
    500: "a server bug (logged with its traceback); never caused by input",
    503: "the model is loading, or the server is shutting down",
}


STREAM_EVENTS = (GenerateTokenEvent, GenerateFinalEvent, CompletionChunk)  # documented only inside event streams
GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
KEYED_PATHS = GENERATION_PATHS + ("/v1/models", "/tokenize", "/detokenize", "/tokenizer_info")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": ERRORS[code]}
                                            for code in codes}
    if 429 in codes:
        out[429]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


def json_body_doc(body: type) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its JSON body itself (see the module docstring)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": REF.format(model=body.__name__)}}}}}


def generation_doc(body: type) -> dict[str, Any]:
    """`openapi_extra` of a generation route: its JSON body and the `loops` query parameter."""
    return {
        **json_body_doc(body),
        "parameters": [{"name": "loops", "in": "query", "required": False,
                        "description": "outer loops (depth), or `auto`; wins over the body's `loops`",
                        "schema": {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}}],
    }


def stream_content(description: str, *events: type) -> dict[str, Any]:
    """`text/event-stream` whose every event's `data` is `[DONE]` or one of `events` as JSON (the schema of one
    event, as OpenAPI 3.1 reads it; its JSON payload is stated with contentMediaType + contentSchema)."""
    payload = {"anyOf": [{"$ref": REF.format(model=e.__name__)} for e in events]}
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json", "contentSchema": payload}}
    return {"text/event-stream": {"schema": {"type": "object", "description": description, "required": ["data"],
                                             "properties": {"data": data}}}}


def build_openapi(app: FastAPI, state: Any) -> dict[str, Any]:
    """The document, cached once the model is loaded (its limits are part of it)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from .chat import ChatBody, ChatChunk, DetokenizeBody, TokenizeBody  # chat imports the schemas documented here

    doc = get_openapi(title="loopgpt", version=app.version, description=DESCRIPTION, routes=app.routes)
    bodies = (GenerateBody, CompletionBody, ChatBody, TokenizeBody, DetokenizeBody)
    _, defs = models_json_schema([(b, "validation") for b in bodies]
                                 + [(m, "serialization") for m in STREAM_EVENTS + (ChatChunk,)], ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    if state.options.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in KEYED_PATHS:
            for operation in doc["paths"][path].values():
                operation["security"] = [{"bearer": []}]
    if state.loaded is None:
        return doc
    state_limits(doc, state.config, state.options)
    app.openapi_schema = doc
    return doc


def state_limits(doc: dict[str, Any], cfg: Any, options: Any) -> None:
    """The loaded checkpoint's and the server's limits, written into the body and query schemas."""
    schemas = doc["components"]["schemas"]
    token_id = {"minimum": 0, "maximum": cfg.vocab_size - 1}
    for name in ("GenerateBody", "CompletionBody", "ChatBody"):
        props = schemas[name]["properties"]
        for field in ("loops", "max_loops", "min_loops"):
            _integer_branch(props[field]).update(minimum=1, maximum=cfg.loop_cap)
        _integer_branch(props["max_tokens"]).update(maximum=cfg.block_size - 1)
        _array_branch(props["stop_token_ids"])["items"].update(token_id)
        for field in ("n", "best_of"):  # a prompt's candidates are admitted together: at most a batch
            if field in props:
                _integer_branch(props[field]).update(maximum=options.max_batch)
    _integer_branch(schemas["ChatBody"]["properties"]["max_completion_tokens"]).update(maximum=cfg.block_size - 1)
    for branch in schemas["CompletionBody"]["properties"]["prompt"]["anyOf"]:
        items = branch.get("items", {})
        if items.get("type") == "integer":
            items.update(token_id)
        elif items.get("type") == "array":  # a list of token-id lists: one queue entry each
            items["items"].update(token_id)
            branch["maxItems"] = options.max_queue
        elif items.get("type") == "string":
            branch["maxItems"] = options.max_queue
    schemas["DetokenizeBody"]["properties"]["tokens"]["items"].update(token_id)
    for path in GENERATION_PATHS:
        for param in doc["paths"][path]["post"]["parameters"]:
            if param["name"] == "loops":
                _integer_branch(param["schema"])["maximum"] = cfg.loop_cap


def _array_branch(prop: dict[str, Any]) -> dict[str, Any]:
    branch = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == "array"), None)
    assert branch is not None, f"no array schema in {prop}"
    return branch


def _integer_branch(prop: dict[str, Any]) -> dict[str, Any]:
    branch = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == "integer"), None)
    assert branch is not None, f"no integer schema in {prop}"
    return branch

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
    404: "the `model` is not the one served (`model_not_found`)",
    413: "body larger than --max-body",
    415: "Content-Type is not application/json",
    429: "queue full: retry after `Retry-After` seconds",
    500: "a server bug (logged with its traceback); never caused by input",
    503: "the model is loading, or the server is shutting down",
}


STREAM_EVENTS = (GenerateTokenEvent, GenerateFinalEvent, CompletionChunk)  # documented only inside event streams


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse, "description": ERRORS[code]}
                                            for code in codes}
    if 429 in codes:
        out[429]["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


def generation_doc(body: type) -> dict[str, Any]:
    """`openapi_extra` of a generation route: its JSON body and the `loops` query parameter."""
    return {
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": {"$ref": REF.format(model=body.__name__)}}}},
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
    doc = get_openapi(title="loopgpt", version=app.version, description=DESCRIPTION, routes=app.routes)
    _, defs = models_json_schema([(GenerateBody, "validation"), (CompletionBody, "validation")]
                                 + [(m, "serialization") for m in STREAM_EVENTS], ref_template=REF)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
    if state.options.api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path in ("/generate", "/v1/completions", "/v1/models"):
            for operation in doc["paths"][path].values():
                operation["security"] = [{"bearer": []}]
    if state.loaded is None:
        return doc
    state_limits(doc, state.config)
    app.openapi_schema = doc
    return doc


def state_limits(doc: dict[str, Any], cfg: Any) -> None:
    """The loaded checkpoint's limits, written into the body and query schemas."""
    schemas = doc["components"]["schemas"]
    for name in ("GenerateBody", "CompletionBody"):
        props = schemas[name]["properties"]
        _integer_branch(props["loops"]).update(minimum=1, maximum=cfg.loop_cap)
        _integer_branch(props["max_loops"]).update(minimum=1, maximum=cfg.loop_cap)
        _integer_branch(props["min_loops"]).update(maximum=cfg.loop_cap)
        _integer_branch(props["max_tokens"]).update(maximum=cfg.block_size - 1)
    for branch in schemas["CompletionBody"]["properties"]["prompt"]["anyOf"]:
        if branch.get("items", {}).get("type") == "integer":
            branch["items"].update(minimum=0, maximum=cfg.vocab_size - 1)
    for path in ("/generate", "/v1/completions"):
        for param in doc["paths"][path]["post"]["parameters"]:
            if param["name"] == "loops":
                _integer_branch(param["schema"])["maximum"] = cfg.loop_cap


def _integer_branch(prop: dict[str, Any]) -> dict[str, Any]:
    branch = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == "integer"), None)
    assert branch is not None, f"no integer schema in {prop}"
    return branch

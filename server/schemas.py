"""Request and response bodies (pydantic) and OpenAI-shaped errors of the HTTP API.

One type rule for every field, OpenAI's: strict. A number is never read from a string (`"0.5"`) nor an
integer from a float (`1.0`); a JSON integer is a valid float (`temperature: 1`). Unknown fields are ignored,
as OpenAI and vLLM do; OpenAI fields this server does not implement yet (`n` > 1, `best_of` > 1, `echo`,
`logprobs`, `suffix`) are refused by name. Every rejected field is named in the error's `param`.
The OpenAPI document (`/openapi.json`) is generated from these models.

    python -c "from loopgpt.server.schemas import GenerateBody; print(GenerateBody(prompt='hi'))"
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.requests import Request

SEED_MAX = 2**63 - 1


class APIError(Exception):
    """An error a client caused or must wait out; rendered as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable"}.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Unsupported = WithJsonSchema({"type": "null", "description": "not supported yet: leave it out"})


def documented(**constraints: Any) -> Any:
    """Constraints stated in the OpenAPI schema but checked by our own code, whose error names the problem
    better than a generic validation message ("stop takes at most 4 strings", "n is not supported yet")."""
    return Field(json_schema_extra=constraints)


class SpeculativeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    draft_loops: int = Field(ge=1, description="loops a draft token runs before the head guesses its successor "
                             "(1..loops-1)")
    tokens: int | None = Field(default=None, ge=1, description="drafts in flight at once (default and most: the "
                               "server's --spec-tokens)")


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate; prompt + max_tokens must "
                                   "fit the context (default: the endpoint's default, cut to the context left)")
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False, description="0 is greedy")
    top_k: int = Field(default=0, ge=0, description="keep the k likeliest tokens; 0 keeps all")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, description="seed for reproducible sampling")
    stop: str | Annotated[list[str], documented(maxItems=4)] | None = Field(
        default=None, description="up to 4 stop strings; the text ends before the first")
    stream: bool = Field(default=False, description="Server-Sent Events, one per token")
    loops: int | Literal["auto"] | None = Field(
        default=None, description="outer loops (depth) for this request, or `auto`: each token stops looping once "
        "its state has converged (within `max_loops`); a `loops` query parameter wins (default: the checkpoint's "
        "trained maximum)")
    max_loops: int | None = Field(default=None, description="with loops `auto`: the most loops a token may run "
                                  "(default: the checkpoint's trained maximum)")
    tolerance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="with loops `auto`: a "
                                    "token stops once its state changed by less than this over a loop (1 - cosine "
                                    "of consecutive states; default: the server's --adaptive-tolerance)")
    min_loops: int | None = Field(default=None, ge=1, description="with loops `auto`: loops every token runs "
                                  "(default: the server's --adaptive-min-loops)")
    speculative: Literal["auto", "off"] | SpeculativeSpec | None = Field(
        default=None, description="self-speculative decoding: drafts from this request's own first `draft_loops` "
        "loops, verified at its last loop (greedy output unchanged, sampled output keeps its distribution); `auto` "
        "picks and adapts the draft depth; default: the server's --speculative")
    default_max_tokens: ClassVar[int] = 64

    def tokens_to_generate(self, n_prompt: int, context: int) -> int:
        """max_tokens as given, else the endpoint's default cut to the context left after the prompt."""
        if self.max_tokens is not None:
            return self.max_tokens
        return max(1, min(self.default_max_tokens, context - n_prompt))

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stops)}", "stop")
        return [s for s in stops if s]

    def check_supported(self) -> None:
        """Refuse, by name, a field this server accepts in the schema but cannot honour yet."""


class GenerateBody(SamplingBody):
    prompt: str = Field(description="the text to continue", json_schema_extra={"minLength": 1})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class CompletionBody(SamplingBody):
    """OpenAI's /v1/completions; `prompt` may be a string, a one-string list, or token ids."""

    prompt: (Annotated[str, documented(minLength=1)]
             | Annotated[list[Annotated[str, documented(minLength=1)]], documented(minItems=1, maxItems=1)]
             | Annotated[list[int], documented(minItems=1)]) = Field(
        description="a string, a list of one string, or a list of token ids")
    model: str | None = Field(default=None, description="the served model's id (GET /v1/models); absent means it")
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default
    n: int = Field(default=1, ge=1, json_schema_extra={"maximum": 1}, description="only 1 is supported yet")
    best_of: int | None = Field(default=None, json_schema_extra={"minimum": 1, "maximum": 1},
                                description="only 1 is supported yet")
    echo: bool = Field(default=False, json_schema_extra={"enum": [False]}, description="not supported yet: false")
    logprobs: Annotated[int | None, Unsupported] = None
    suffix: Annotated[str | None, Unsupported] = None
    stream_options: StreamOptions | None = None

    def prompt_text_or_ids(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, f"prompt: one prompt per request is supported, got {len(p)}", "prompt")
            return p[0]
        return p

    def check_supported(self) -> None:
        for name, refused in (("n", self.n != 1), ("best_of", self.best_of not in (None, 1)), ("echo", self.echo),
                              ("logprobs", self.logprobs is not None), ("suffix", self.suffix is not None)):
            if refused:
                raise APIError(400, f"{name} is not supported yet (got {getattr(self, name)!r}); leave it out",
                               name, code="unsupported_parameter")


# ---- responses (documented in /openapi.json, and built through these models) ----

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timing(BaseModel):
    ttft_s: float | None = Field(description="arrival to first token")
    e2e_s: float = Field(description="arrival to the last event")
    tokens_per_s: float = Field(description="completion tokens / e2e_s")


class Quality(BaseModel):
    prompt_nll: float | None = Field(description="mean NLL (nats) of the prompt's own tokens at this depth")
    token_nll: float | None = Field(description="mean NLL (nats) of the generated tokens")


FinishReason = Literal["stop", "length", "abort"]


class GenerateResponse(BaseModel):
    text: str
    model: str
    finish_reason: FinishReason
    usage: Usage
    loops: int | Literal["auto"]
    loops_per_token: float | None = Field(default=None, description="mean loops of the decoded tokens (the "
                                           "first comes from the prefill)")
    timing: Timing
    quality: Quality


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    loops: int | Literal["auto"]
    loops_per_token: float | None = Field(default=None, description="mean loops of the decoded tokens (the "
                                           "first comes from the prefill)")
    timing: Timing
    quality: Quality


class GenerateTokenEvent(BaseModel):
    """One Server-Sent Event of a streamed /generate, per token."""

    text: str
    token_id: int
    index: int


class GenerateFinalEvent(BaseModel):
    """The last event of a streamed /generate before `[DONE]`."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    loops: int | Literal["auto"]
    loops_per_token: float | None = Field(default=None, description="mean loops of the decoded tokens (the "
                                           "first comes from the prefill)")
    timing: Timing
    quality: Quality


class CompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed /v1/completions (OpenAI's `text_completion` chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice] = Field(description="empty in the usage chunk")
    usage: Usage | None = Field(default=None, description="with stream_options.include_usage")
    loops: int | Literal["auto"] | None = Field(default=None, description="on the chunk that carries finish_reason")
    loops_per_token: float | None = Field(default=None, description="on the chunk that carries finish_reason")
    timing: Timing | None = None
    quality: Quality | None = None


class LoopsRange(BaseModel):
    min: int
    max: int = Field(description="the largest loop count a request may ask for")
    default: int
    trained: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loopgpt"
    loops: LoopsRange
    context: int = Field(description="context in tokens: prompt + max_tokens")
    eval_loss: dict[str, float] = Field(description="held-out loss per loop count, from the checkpoint's eval.json")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    running: int
    waiting: int


# ---- reading a body ----

def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, limit: int) -> dict:
    """The JSON object body, or an APIError: 415 wrong content type, 413 too large, 400 not JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes, the limit is {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError as e:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, an integer over Python's 4300 digits, NaN
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def union_member(part: Any) -> bool:
    """A location part naming which member of a union failed (`SpeculativeSpec`, `literal['auto','off']`)."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def parse_body(model: type[SamplingBody], data: dict) -> SamplingBody:
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        # Of a union's errors (one per member), the deepest says most: `speculative.draft_loops`, not the literal's.
        err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
        param = str(err["loc"][0]) if err["loc"] else None  # the top-level field, as OpenAI names it
        where = ".".join(str(p) for p in err["loc"] if not union_member(p))
        raise APIError(400, f"{where}: {err['msg']}" if where else err["msg"], param) from e
    body.check_supported()
    return body


def query_loops(values: list[str]) -> int | str | None:
    """`?loops=N` or `?loops=auto` (the values of every `loops` key); anything else, or a repeated key, is a 400
    naming `loops`."""
    if not values:
        return None
    if len(values) > 1:
        raise APIError(400, f"loops is given {len(values)} times in the query; give it once", "loops")
    if values[0].strip() == "auto":
        return "auto"
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", values[0].strip()):
        raise APIError(400, f"loops must be an integer or auto, got {values[0][:40]!r}", "loops")
    return int(values[0])

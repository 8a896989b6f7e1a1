"""Request and response bodies (pydantic) and OpenAI-shaped errors of the HTTP API.

One type rule for every field, OpenAI's: strict. A number is never read from a string (`"0.5"`) nor an
integer from a float (`1.0`); a JSON integer is a valid float (`temperature: 1`). Unknown fields are ignored,
as OpenAI and vLLM do; OpenAI fields this server does not implement (`suffix`, `logit_bias`, non-zero
penalties) are refused by name. Every rejected field is named in the error's `param`. Chat bodies:
`server/chat.py`.
The OpenAPI document (`/openapi.json`) is generated from these models.

    python -c "from loopgpt.server.schemas import GenerateBody; print(GenerateBody(prompt='hi'))"
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from loopgpt.model.sampling import SEED_MAX
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from starlette.requests import Request

from .options import SPEC_TOKENS_MAX

TEMPERATURE_MAX = 2.0  # OpenAI's bound; far above it the float32 logits / temperature lose all meaning
MAX_INT_DIGITS = 100  # far above any field's range (a seed has 19 digits), far below what int() takes long to read
PRIORITY_LIMIT = 2**31  # |priority| below this: a label of the per-priority gauge stays short


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
    tokens: int | None = Field(default=None, ge=1, le=SPEC_TOKENS_MAX, description="drafts in flight at once "
                               "(default and most: the server's --spec-tokens)")


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate; prompt + max_tokens must "
                                   "fit the context (default: the endpoint's default, cut to the context left)")
    temperature: float = Field(default=1.0, ge=0.0, le=TEMPERATURE_MAX, allow_inf_nan=False,
                               description="0 is greedy; at most 2, as OpenAI")
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
    tolerance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="with loops `auto`: a "
                                    "token stops once its state changed by less than this over a loop (1 - cosine "
                                    "of consecutive states; default: the server's --adaptive-tolerance)")
    min_loops: int | None = Field(default=None, ge=1, description="with loops `auto`: loops every token runs "
                                  "(default: the server's --adaptive-min-loops)")
    speculative: Literal["auto", "off"] | SpeculativeSpec | None = Field(
        default=None, description="self-speculative decoding: drafts from this request's own first `draft_loops` "
        "loops, verified at its last loop (greedy output unchanged, sampled output keeps its distribution); `auto` "
        "picks and adapts the draft depth; default: the server's --speculative")
    min_tokens: int = Field(default=0, ge=0, description="tokens generated before EOS or a stop_token_ids token may "
                            "be sampled (at most max_tokens)")
    ignore_eos: bool = Field(default=False, description="keep generating after the end-of-text token (it becomes "
                             "part of the text)")
    stop_token_ids: list[int] | None = Field(default=None, description="token ids that end the completion as EOS "
                                             "does (not part of the text)")
    priority: int = Field(default=0, ge=-PRIORITY_LIMIT, lt=PRIORITY_LIMIT, description="admission order: lower "
                          "first, ties in arrival order")
    max_loops: int | None = Field(default=None, ge=1, description="compute budget: the deepest loops this request "
                                  "may run (with loops `auto`, the most each token may run, default the trained "
                                  "maximum; with loops absent, the default depth is cut to it; loops above it is "
                                  "a 400)")
    default_max_tokens: ClassVar[int] = 64

    def candidates(self) -> int:
        """Sequences generated per prompt."""
        return 1

    def engine_fields(self) -> dict[str, Any]:
        """What the engine's Request takes from this body besides prompt, depth, length and sampling (those are
        server/admission.py's)."""
        return {"min_tokens": self.min_tokens, "stop_token_ids": list(self.stop_token_ids or []),
                "priority": self.priority, "eos_token": -1 if self.ignore_eos else None}

    def check_tokens(self, max_tokens: int) -> None:
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")

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


class OpenAIBody(SamplingBody):
    """Fields /v1/completions and /v1/chat/completions share: choices, penalties (refused), the model's id."""

    model: str | None = Field(default=None, description="one of the served model's names (GET /v1/models "
                              "reports the first; `serve --served-model-name`); absent means it; `<name>:loops=N` also "
                              "names a depth (below the query's and the body's loops)")
    n: int = Field(default=1, ge=1, description="choices per prompt, sampled with seeds seed, seed + 1, ... (the "
                   "prompt is prefilled once; at most the server's --max-batch)")
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, allow_inf_nan=False, json_schema_extra={"enum": [0]},
                                    description="not supported: 0")
    frequency_penalty: float = Field(default=0.0, allow_inf_nan=False, json_schema_extra={"enum": [0]},
                                     description="not supported: 0")
    logit_bias: Annotated[dict | None, Unsupported] = None
    user: str | None = Field(default=None, description="accepted and ignored")
    refused: ClassVar[tuple[str, ...]] = ("presence_penalty", "frequency_penalty", "logit_bias")

    def check_supported(self) -> None:
        for name in self.refused:  # a penalty of 0 and a null are what these fields may be
            if getattr(self, name) not in (None, 0):
                raise APIError(400, f"{name} is not supported (got {getattr(self, name)!r}); leave it out", name,
                               code="unsupported_parameter")

    def candidates(self) -> int:
        return self.n


class CompletionBody(OpenAIBody):
    """OpenAI's /v1/completions: `prompt` is a string, token ids, or a list of either (one choice set each)."""

    prompt: (Annotated[str, documented(minLength=1)]
             | Annotated[list[Annotated[str, documented(minLength=1)]], documented(minItems=1)]
             | Annotated[list[int], documented(minItems=1)]
             | Annotated[list[Annotated[list[int], documented(minItems=1)]], documented(minItems=1)]) = Field(
        description="a string, a list of token ids, or a list of strings or of token-id lists (choices "
        "`prompt_index * n + i`)")
    max_tokens: int | None = Field(default=None, ge=0, description="tokens to generate; 0 with echo scores the "
                                   "prompt alone; prompt + max_tokens must fit the context (default 16)")
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default
    best_of: int | None = Field(default=None, ge=1, description="sequences generated per prompt, of which the n with "
                                "the highest cumulative logprob are returned (>= n; not with stream)")
    echo: bool = Field(default=False, description="the prompt comes back before the completion (with its logprobs, "
                       "the first null)")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="log-probabilities of each token and of the "
                                 "k likeliest alternatives (the sampled one always among them), at this depth")
    suffix: Annotated[str | None, Unsupported] = None
    refused: ClassVar[tuple[str, ...]] = OpenAIBody.refused + ("suffix",)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def candidates(self) -> int:
        return max(self.n, self.best_of or 1)

    def engine_fields(self) -> dict[str, Any]:
        echo_scores = self.logprobs if self.echo else None
        return {**super().engine_fields(), "logprobs": self.logprobs, "prompt_logprobs": echo_scores}

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(400, f"best_of ({self.best_of}) must be >= n ({self.n})", "best_of")
        if self.stream and self.candidates() > self.n:
            raise APIError(400, "best_of > n cannot stream: the best are known only at the end", "best_of")


# ---- responses (documented in /openapi.json, and built through these models) ----

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens served from the prefix cache (not prefilled again)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Timing(BaseModel):
    ttft_s: float | None = Field(description="arrival to first token")
    e2e_s: float = Field(description="arrival to the last event")
    tokens_per_s: float = Field(description="completion tokens / e2e_s")


class Quality(BaseModel):
    prompt_nll: float | None = Field(description="mean NLL (nats) of the prompt's own tokens at this depth")
    token_nll: float | None = Field(description="mean NLL (nats) of the generated tokens")


FinishReason = Literal["stop", "length", "abort"]
# The depth fields every response and final event carries (one definition for every route and shape).
RanLoops = int | Literal["auto"]  # the request's loops, as it gave them
LoopsPerToken = Annotated[float | None, Field(default=None, description="mean loops of the decoded tokens (the "
                                               "first comes from the prefill)")]
ChunkLoops = Annotated[RanLoops | None, Field(default=None, description="on the chunk that carries finish_reason")]
ChunkLoopsPerToken = Annotated[float | None, Field(default=None, description="on the chunk that carries "
                                                    "finish_reason")]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first token of an echoed prompt")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class OpenAIResponse(BaseModel):
    """The envelope of OpenAI's responses (completion and chat) with loopgpt's depth fields; a subclass names
    `object` and the type of `choices` (a redefined field keeps its place in the JSON)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage
    loops: RanLoops
    loops_per_token: LoopsPerToken
    timing: Timing
    quality: Quality


class CompletionResponse(OpenAIResponse):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


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
    loops: RanLoops
    loops_per_token: LoopsPerToken
    timing: Timing
    quality: Quality


class GenerateResponse(GenerateFinalEvent):
    """A /generate without stream: the final event's fields (`text` the whole completion) and the model."""

    model: str


class OpenAIChunk(BaseModel):
    """The envelope of OpenAI's stream chunks (completion and chat), as OpenAIResponse is of the responses."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any] = Field(description="empty in the usage chunk")
    usage: Usage | None = Field(default=None, description="with stream_options.include_usage")
    loops: ChunkLoops
    loops_per_token: ChunkLoopsPerToken
    timing: Timing | None = None
    quality: Quality | None = None


class CompletionChunk(OpenAIChunk):
    """One Server-Sent Event of a streamed /v1/completions (OpenAI's `text_completion` chunk)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice] = Field(description="empty in the usage chunk")


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


class IntegerTooLong(ValueError):
    pass


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:  # before int(), whose time grows with the square of the digits
        raise IntegerTooLong(f"request body has an integer of {digits} digits; no field takes one of more than 19")
    return int(text)


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
        data = json.loads(body, parse_constant=_refuse_constant, parse_int=_parse_int)
    except IntegerTooLong as e:
        raise APIError(400, str(e), code="invalid_json") from e
    except RecursionError as e:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, NaN
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def union_member(part: Any) -> bool:
    """A location part naming which member of a union failed (`SpeculativeSpec`, `literal['auto','off']`)."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def parse_body(model: type[BaseModel], data: dict) -> Any:
    """A validated body (any of ours: each has `check_supported`), or a 400 naming the field."""
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

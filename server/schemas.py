"""Request bodies (pydantic) and OpenAI-shaped errors of the HTTP API.

Unknown fields are ignored, as OpenAI and vLLM do; every rejected field is named in the error's
`param` so a client can fix it.

    python -c "from loopgpt.server.schemas import GenerateBody; print(GenerateBody(prompt='hi'))"
"""

from __future__ import annotations

import json
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
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


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(default=None, ge=1, strict=True)  # None: default_max_tokens, within context
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, strict=True)
    stop: str | list[str] | None = Field(default=None)
    stream: bool = False
    loops: int | None = Field(default=None, strict=True)
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


class GenerateBody(SamplingBody):
    prompt: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionBody(SamplingBody):
    """OpenAI's /v1/completions; `prompt` may be a string, a one-string list, or token ids."""

    prompt: str | list[str] | list[int]
    model: str | None = None
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default
    n: int = Field(default=1, ge=1, le=1)
    stream_options: StreamOptions | None = None

    def prompt_text_or_ids(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, f"prompt: one prompt per request is supported, got {len(p)}", "prompt")
            return p[0]
        return p


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
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def parse_body(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from e


def query_loops(raw: str | None) -> int | None:
    """`?loops=N`; a non-integer is a 400 naming `loops`."""
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError as e:
        raise APIError(400, f"loops must be an integer, got {raw!r}", "loops") from e

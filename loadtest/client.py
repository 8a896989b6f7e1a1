"""One streamed request against a loopgpt server, timed token by token (httpx + Server-Sent Events).

Speaks both endpoints of DESIGN.md's HTTP contract: `POST /generate?loops=N` (one event per token,
a final event with finish_reason, usage, timing and quality, then `[DONE]`) and the OpenAI-shaped
`POST /v1/completions` (`loops` as an extra body field).

    python -c "import asyncio, httpx; from loopgpt.loadtest.client import send; \
print(asyncio.run(send(httpx.AsyncClient(), 'http://127.0.0.1:8000', 'Hi', 2, 8)))"
"""

from __future__ import annotations

import json
import time

import httpx

from .stats import RequestRecord

ENDPOINTS = ("generate", "completions")
REPLICA_HEADER = "x-loopgpt-replica"  # set by each replica behind a router (Ray Serve, a Kubernetes Service)


def request_body(endpoint: str, prompt: str, loops: int, max_tokens: int, temperature: float,
                 seed: int | None, ignore_eos: bool = False) -> tuple[str, dict, dict]:
    """(path, query params, JSON body) for one streamed request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
    if seed is not None:
        body["seed"] = seed
    if ignore_eos:  # every request then generates exactly max_tokens: equal work per request
        body["ignore_eos"] = True
    if endpoint == "generate":
        return "/generate", {"loops": loops}, body
    if endpoint == "completions":
        # no `model`: absent means the served one; the usage chunk gives the token counts (prompt and completion)
        return "/v1/completions", {}, {**body, "loops": loops, "stream_options": {"include_usage": True}}
    raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")


def error_message(raw: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the body's first 200 characters."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:200]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", text[:200]))
    if isinstance(data, dict) and "detail" in data:  # a framework-level error that bypassed our handler
        return str(data["detail"])[:200]
    return text[:200]


def read_event(record: RequestRecord, event: dict, endpoint: str) -> bool:
    """Fold one SSE JSON event into `record`; True when the event carried a new token."""
    if endpoint == "completions":
        choice = (event.get("choices") or [{}])[0]
        final = choice.get("finish_reason") is not None
        if final:
            record.finish_reason = choice["finish_reason"]
        usage = event.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            record.tokens = int(usage["completion_tokens"])
            record.prompt_tokens = usage.get("prompt_tokens")
        # one chunk per token, its text possibly empty (bytes of a character not yet complete); the usage chunk
        # has no choice
        return not final and bool(event.get("choices"))
    if "error" in event:  # an error after the stream began (the engine aborted the request)
        record.error = error_message(json.dumps(event).encode())
        return False
    if "token_id" in event:
        return True
    if "finish_reason" in event:
        record.finish_reason = event["finish_reason"]
        usage = event.get("usage") or {}
        if usage.get("completion_tokens") is not None:
            record.tokens = int(usage["completion_tokens"])
        record.prompt_tokens = usage.get("prompt_tokens")
        quality = event.get("quality") or {}
        record.prompt_nll = quality.get("prompt_nll")
        record.token_nll = quality.get("token_nll")
    return False


async def send(client: httpx.AsyncClient, url: str, prompt: str, loops: int, max_tokens: int,
               temperature: float = 0.8, seed: int | None = None, endpoint: str = "generate",
               start: float = 0.0, ignore_eos: bool = False) -> RequestRecord:
    """Send one streamed request and time it; never raises for a server or network failure."""
    path, params, body = request_body(endpoint, prompt, loops, max_tokens, temperature, seed, ignore_eos)
    record = RequestRecord(loops=loops, start=start, url=url)
    t0 = time.perf_counter()
    last = None
    seen = 0
    try:
        async with client.stream("POST", url.rstrip("/") + path, params=params, json=body) as response:
            record.status = response.status_code
            record.replica = response.headers.get(REPLICA_HEADER)
            if response.status_code != 200:
                record.error = error_message(await response.aread())
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments and keep-alive pings
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                if read_event(record, json.loads(payload), endpoint):
                    seen += 1
                    if last is None:
                        record.ttft = now - t0
                    else:
                        record.itls.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:  # counted as a failed request, never fatal
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.e2e = time.perf_counter() - t0
    record.tokens = record.tokens or seen
    if record.finish_reason is None and record.error is None:
        record.error = "stream ended without a final event"
    return record

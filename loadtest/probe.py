"""What the load generator asks a server besides load: prompts cut to a token length (its /tokenize and /detokenize,
so the lengths are in the served model's own tokens) and the CPU seconds its processes have used (its /metrics).

    loopgpt loadtest --url http://127.0.0.1:8000 --sweep 1,4,16,32 --rounds 4 --prompt-tokens 32:64
"""

from __future__ import annotations

import asyncio
import random

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .client import error_message

# CPU seconds the server's processes have used: the API process (prometheus_client's process collector) and, where
# the engine runs in a process of its own, the engine's. A series a server does not expose counts as 0.
CPU_SERIES = ("process_cpu_seconds_total", "loopgpt_engine_cpu_seconds_total")
SOURCE_CHARS = 20_000  # of the prompt texts, tokenized once: far more than the windows need, well under --max-body


def parse_token_range(text: str) -> tuple[int, int]:
    """`32:64` (inclusive) or `48` -> (low, high)."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"--prompt-tokens takes a length or a range such as 32:64, got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"--prompt-tokens needs 1 <= low <= high, got {text!r}")
    return low, high


async def _post(client: httpx.AsyncClient, url: str, path: str, body: dict) -> dict:
    try:
        response = await client.post(url.rstrip("/") + path, json=body)
    except httpx.HTTPError as e:
        raise ValueError(f"--prompt-tokens needs the server's {path}, which failed: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise ValueError(f"--prompt-tokens needs the server's {path}, which answered {response.status_code}: "
                         f"{error_message(response.content)}")
    return response.json()


async def sized_prompts(client: httpx.AsyncClient, url: str, texts: list[str], low: int, high: int, seed: int,
                        count: int = 64) -> list[str]:
    """`count` prompts of `low`..`high` tokens (uniform, seeded): windows of the texts joined, tokenized by the
    server, each turned back into text by the server, so that the load still pays for tokenization."""
    source = " ".join(texts)[:SOURCE_CHARS]
    ids = (await _post(client, url, "/tokenize", {"prompt": source}))["tokens"]
    if not ids:
        raise ValueError("--prompt-tokens: the prompt texts tokenize to nothing")
    ids = ids * -(-high // len(ids))  # repeated until one window of the longest length fits
    rng = random.Random(f"prompt-tokens-{seed}")
    windows = []
    for _ in range(count):
        n = rng.randint(low, high)
        start = rng.randrange(len(ids) - n + 1)
        windows.append(ids[start:start + n])
    texts = await asyncio.gather(*(_post(client, url, "/detokenize", {"tokens": w}) for w in windows))
    return [t["prompt"] for t in texts]


def cpu_seconds(exposition: str) -> float | None:
    """The sum of CPU_SERIES in a Prometheus text exposition (every label set); None when none is there."""
    found = [sample.value for family in text_string_to_metric_families(exposition) for sample in family.samples
             if sample.name in CPU_SERIES]
    return sum(found) if found else None


async def server_cpu_seconds(client: httpx.AsyncClient, urls: list[str]) -> float | None:
    """CPU seconds used so far by the servers at `urls`; None when one of them cannot be read or does not say (the
    report then shows no CPU figure rather than a wrong one)."""
    total = 0.0
    for url in urls:
        try:
            response = await client.get(url.rstrip("/") + "/metrics")
            used = cpu_seconds(response.text) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):  # ValueError: not the Prometheus text format
            return None
        if used is None:
            return None
        total += used
    return total

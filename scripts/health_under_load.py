"""/health latency while clients send large /tokenize bodies beside running streams (issue 25's measurement):
N clients post ~1 MB prompts to /tokenize back to back, a few clients stream /generate, and a prober in its own
process (so that the load's client-side work does not delay it) GETs /health every 20 ms. Prints one JSON line:
/health p50/p99/max in ms, /tokenize requests and their p50, and the longest pause of a running stream.

    loopgpt serve --port 8123 &
    python scripts/health_under_load.py --url http://127.0.0.1:8123 --seconds 60 --clients 8 --mb 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import time

import httpx

WORDS = ("once upon a time there was a little girl named Lily who loved to play outside in the sun one day she saw "
         "a big red ball in the park and asked her mom if she could play with it").split()


def big_prompt(megabytes: float, seed: int = 0) -> bytes:
    """A /tokenize body whose prompt is `megabytes` of story-like words (BPE works on it as on real text)."""
    rng = random.Random(seed)
    words, size = [], 0
    while size < megabytes * (1 << 20) - 64:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return json.dumps({"prompt": " ".join(words)}).encode()


def percentile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def tokenize_client(client: httpx.AsyncClient, url: str, body: bytes, until: float, out: list) -> None:
    while time.perf_counter() < until:
        start = time.perf_counter()
        r = await client.post(f"{url}/tokenize", content=body, headers={"content-type": "application/json"})
        out.append((r.status_code, time.perf_counter() - start))


async def stream_client(client: httpx.AsyncClient, url: str, until: float, gaps: list, statuses: list) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 64, "stream": True, "temperature": 0.8}
    while time.perf_counter() < until:
        async with client.stream("POST", f"{url}/generate", json=body) as r:
            statuses.append(r.status_code)
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now


async def load(url: str, seconds: float, clients: int, megabytes: float, streams: int) -> dict:
    body = big_prompt(megabytes)
    until = time.perf_counter() + seconds
    done: list = []
    gaps: list = []
    statuses: list = []
    limits = httpx.Limits(max_connections=clients + streams + 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*[tokenize_client(client, url, body, until, done) for _ in range(clients)],
                             *[stream_client(client, url, until, gaps, statuses) for _ in range(streams)])
    ok = [s for s, _ in done if s == 200]
    return {"tokenize_requests": len(done), "tokenize_ok": len(ok),
            "tokenize_p50_s": round(percentile([t for _, t in done], 50), 3) if done else None,
            "streams": len(statuses), "streams_ok": statuses.count(200),
            "stream_gap_max_ms": round(max(gaps) * 1e3, 1) if gaps else None,
            "stream_gap_p99_ms": round(percentile(gaps, 99) * 1e3, 1) if len(gaps) > 1 else None}


def run_load(url: str, seconds: float, clients: int, megabytes: float, streams: int, results) -> None:
    results.put(asyncio.run(load(url, seconds, clients, megabytes, streams)))


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url}/health did not answer 200 within {timeout_s:g} s")
        time.sleep(0.5)


def measure(url: str, seconds: float = 60, clients: int = 8, megabytes: float = 1.0, streams: int = 2) -> dict:
    """The report: /health latencies (ms) under the load, and the load's own numbers."""
    wait_ready(url)
    results = multiprocessing.get_context("spawn").Queue()
    loader = multiprocessing.get_context("spawn").Process(target=run_load,
                                                         args=(url, seconds, clients, megabytes, streams, results))
    loader.start()
    latencies, failures = [], 0
    with httpx.Client(timeout=10) as client:
        until = time.perf_counter() + seconds
        time.sleep(min(2.0, seconds / 10))  # the load is running (the first bodies are on the wire)
        while time.perf_counter() < until:
            start = time.perf_counter()
            try:
                ok = client.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - start)
            failures += not ok
            time.sleep(0.02)
    loader.join(seconds + 120)
    if results.empty():
        raise SystemExit(f"the load process failed (exit code {loader.exitcode}); see its error above")
    report = results.get()
    ms = [t * 1e3 for t in latencies]
    return {"health_requests": len(ms), "health_failures": failures, "health_p50_ms": round(percentile(ms, 50), 1),
            "health_p99_ms": round(percentile(ms, 99), 1), "health_max_ms": round(max(ms), 1),
            "clients": clients, "megabytes": megabytes, "seconds": seconds, **report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="a running `loopgpt serve`, e.g. http://127.0.0.1:8123")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=8, help="clients posting /tokenize back to back")
    p.add_argument("--mb", type=float, default=1.0, help="prompt size of each /tokenize body, in MiB")
    p.add_argument("--streams", type=int, default=2, help="clients streaming /generate meanwhile")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.url.rstrip("/"), args.seconds, args.clients, args.mb, args.streams)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

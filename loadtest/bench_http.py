"""Benchmark rows 3 and 4: the real HTTP server (`loopgpt serve` as a subprocess on 127.0.0.1).

Row 3: aggregate tokens/s with 1, 4, 16 and 32 concurrent streams (one wave of requests each).
Row 4: one stream over HTTP vs the same engine driven in-process (what HTTP, SSE and JSON cost).

    loopgpt bench --checkpoint checkpoints/demo --rows 3,4
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import torch
from loopgpt.model import LoopGPT

from loopgpt import install_hint

from .runner import LoadConfig, run_load
from .timing import Row, interleaved, med

STREAMS = (1, 4, 16, 32)


class ServerError(RuntimeError):
    """`loopgpt serve` did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(checkpoint: str, max_batch: int, threads: int, timeout: float = 180.0, dtype: str = "auto",
          flags: tuple[str, ...] = ()) -> Iterator[str]:
    """A `loopgpt serve` subprocess on a free 127.0.0.1 port (further `flags` appended); yields its base URL, stops
    it after."""
    port = free_port()
    cmd = [sys.executable, "-m", "loopgpt.cli", "serve", "--checkpoint", checkpoint, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch), "--max-queue", "256",
           "--shutdown-grace", "1", "--log-level", "warning", "--threads", str(threads), "--dtype", dtype, *flags]
    # the server gets the same torch thread count as the in-process contenders
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"loopgpt serve exited with code {proc.returncode}: {proc.stderr.read()[-500:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerError(f"loopgpt serve was not healthy after {timeout:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wave(url: str, prompt: str, loops: int, streams: int, n: int) -> tuple[float, int]:
    """`streams` greedy requests sent together; (aggregate completion tokens/s, failed requests)."""
    cfg = LoadConfig(url=url, loops_mix={loops: 1.0}, prompts=[prompt], max_tokens=n, temperature=0.0,
                     concurrency=streams, requests=streams, progress=False)
    records, duration = asyncio.run(run_load(cfg))
    return sum(r.tokens for r in records if r.ok) / duration, sum(not r.ok for r in records)


def http_rows(checkpoint: str, model: LoopGPT, tokenizer, prompt_ids: list[int], n: int, reps: int,
              rows: set[int], engine: Any) -> list[Row]:
    """Rows 3 and/or 4; the text of `prompt_ids` is sent over HTTP and re-tokenised there."""
    prompt = tokenizer.decode(prompt_ids)
    loops = model.config.max_loops
    threads = torch.get_num_threads()
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")  # the in-process contender's, for row 4
    out: list[Row] = []
    with serve(checkpoint, max_batch=max(STREAMS), threads=threads, dtype=dtype) as url:
        wave(url, prompt, loops, 1, n)  # warm-up, excluded
        if 3 in rows:
            out.append(row_streams(url, prompt, loops, n, reps))
        if 4 in rows:
            out.append(row_http_vs_inprocess(url, model, tokenizer, engine, prompt, prompt_ids, loops, n, reps))
    return out


def row_streams(url: str, prompt: str, loops: int, n: int, reps: int) -> Row:
    row = Row(3, f"HTTP aggregate, loops {loops}: 32 streams vs 1", "tok/s", "32 concurrent streams",
              "1 stream", target=10.0)
    samples: dict[int, list[float]] = {}
    failed = 0
    for streams in STREAMS:
        rates = []
        for _ in range(reps):
            rate, bad = wave(url, prompt, loops, streams, n)
            rates.append(rate)
            failed += bad
        samples[streams] = rates
    row.ours, row.base = samples[32], samples[1]
    for streams in STREAMS:
        row.extra[f"{streams} streams, tok/s"] = (f"{med(samples[streams]):.3g} "
                                                  f"({med(samples[streams]) / med(samples[1]):.2f}x one stream)")
    row.extra["failed requests"] = failed
    return row


def row_http_vs_inprocess(url: str, model: LoopGPT, tokenizer, engine: Any, prompt: str, prompt_ids: list[int],
                          loops: int, n: int, reps: int) -> Row:
    row = Row(4, f"batch 1, loops {loops}: HTTP streaming vs in-process", "tok/s",
              "loopgpt serve, one SSE stream (client-side wall time)",
              "the same engine in this process (same prompt, greedy)", target=0.9)
    if engine is None:
        row.skipped = f"the in-process engine needs the server extra: {install_hint('server')}"
        return row
    failed = 0

    def over_http() -> None:
        nonlocal failed
        rate, bad = wave(url, prompt, loops, 1, n)
        failed += bad
        http_rates.append(rate)

    http_rates: list[float] = []
    eng = engine(model, tokenizer, 1)
    try:
        times = interleaved([over_http, lambda: eng.generate([(prompt_ids, loops, n)])], reps)
    finally:
        eng.close()
    row.ours = http_rates[-reps:]  # the warm-up round's rate is dropped
    row.base = [n / t for t in times[1]]
    row.extra["failed requests"] = failed
    return row

"""Engine: one thread that owns the model runner and steps a continuous, depth-wise batch.

Each turn of its loop: admit waiting requests into free KV-cache rows, prefill at most `prefill_chunk`
prompt tokens (chunked prefill: a long prompt is spread over several turns, so the rows already
decoding keep getting a token every turn instead of waiting for the whole prompt), then run ONE
decode forward for every decoding row with a per-row `loops` tensor (loop n runs only on rows whose
count exceeds n, so a mixed batch is never padded to its deepest request), then sample, stream and
retire. HTTP handlers never touch the model: they `submit` a Request whose `emit`
callback hands events to the handler's own asyncio queue.

    python -m pytest tests/test_server_engine.py -q
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from loopgpt.model import SamplingParams, TextStream, Tokenizer, sample_row, token_stats

from .runner import ModelRunner

log = logging.getLogger("loopgpt.server")


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queue; the client should retry later (HTTP 429)."""


class NotAccepting(RuntimeError):
    """The engine is not running or is draining for shutdown (HTTP 503)."""


@dataclass
class TokenEvent:
    index: int
    token_id: int
    text: str
    nll: float
    entropy: float


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" | "length" | "abort"
    text: str  # held-back text released at the end (may be "")
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    e2e_s: float
    prompt_nll: float | None
    token_nll: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.e2e_s if self.e2e_s > 0 else 0.0


@dataclass
class Request:
    prompt_ids: list[int]
    loops: int
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Any], None]  # must be thread-safe: called from the engine thread
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token: int | None = None
    endpoint: str = "generate"
    aborted: bool = False  # set by the HTTP side (client gone); read by the engine at its next step
    arrival: float = field(default_factory=time.perf_counter)
    # engine-side state
    row: int = -1
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    prompt_nll_sum: float = 0.0
    pending: int = -1  # sampled token not yet fed to the model
    n_tokens: int = 0
    nll_sum: float = 0.0
    prompt_nll: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    done: bool = False


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, max_queue: int = 64,
                 metrics: Any = None, prompt_nll: bool = True, prefill_chunk: int = 128):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics  # a ServerMetrics or None
        self.prompt_nll = prompt_nll
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per engine turn, over all requests
        self.prefilling: list[Request] = []  # admitted (row held), prompt not yet all in the cache; FIFO
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Request] = {}  # cache row -> request
        self.free_rows = list(range(runner.max_batch))
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.drain_deadline: float | None = None
        self.steps = 0  # decode forwards run, for tests and logs

    # ---- called from the HTTP side (any thread) ----

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="loopgpt-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.thread is None or self.stopping or self.drain_deadline is not None:
                raise NotAccepting("the server is not accepting requests (starting or shutting down); retry shortly")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            req.eos_token = self.tokenizer.eot_token if req.eos_token is None else req.eos_token
            self.waiting.append(req)
            self.cond.notify()

    def abort(self, req: Request) -> None:
        req.aborted = True
        with self.cond:
            self.cond.notify()

    def drain(self, grace_s: float) -> None:
        """Stop admitting; requests still running after `grace_s` seconds end with finish_reason abort."""
        with self.cond:
            self.drain_deadline = time.perf_counter() + grace_s
            self.cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        return len(self.running), len(self.waiting)

    # ---- the engine thread ----

    def _loop(self) -> None:
        with self.runner.context():
            while True:
                with self.cond:
                    while not (self.stopping or self.waiting or self.running):
                        self.cond.wait(0.5)
                    if self.stopping:
                        break
                try:
                    self._retire_aborted()
                    self._admit()
                    self._prefill_some()
                    if len(self.running) > len(self.prefilling):
                        self._decode_step()
                except (RuntimeError, ValueError):  # a model failure (e.g. out of memory): end its requests, go on
                    log.exception("engine step failed; aborting the requests in the batch")
                    for req in list(self.running.values()):
                        self._finish(req, "abort")
                self._report()
        for req in list(self.running.values()) + list(self.waiting):
            self._finish(req, "abort")

    def _retire_aborted(self) -> None:
        past_deadline = self.drain_deadline is not None and time.perf_counter() >= self.drain_deadline
        with self.cond:
            gone = [r for r in self.waiting if r.aborted or past_deadline]
            for r in gone:
                self.waiting.remove(r)
        for req in gone + [r for r in self.running.values() if r.aborted or past_deadline]:
            self._finish(req, "abort")

    def _admit(self) -> None:
        while self.free_rows:
            with self.cond:
                if not self.waiting:
                    return
                req = self.waiting.popleft()
            req.row = self.free_rows.pop()
            self.running[req.row] = req
            self.prefilling.append(req)
            if self.metrics:
                self.metrics.queued(req, time.perf_counter() - req.arrival)
            req.generator = self.runner.generator(req.seed)
            req.stream = TextStream(self.tokenizer, req.stop)

    def _prefill_some(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, oldest request first; a finished prompt samples its
        first token (and joins this turn's decode step)."""
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            req = self.prefilling[0]
            start = req.prefilled
            end = min(len(req.prompt_ids), start + budget)
            last = end == len(req.prompt_ids)
            logits, nll_sum = self.runner.prefill_chunk(
                req.row, req.prompt_ids[start:end], start, req.loops, None if last else req.prompt_ids[end],
                self.prompt_nll)
            req.prefilled, req.prompt_nll_sum = end, req.prompt_nll_sum + nll_sum
            budget -= end - start
            if not last:
                continue
            self.prefilling.pop(0)
            if self.prompt_nll and len(req.prompt_ids) > 1:
                req.prompt_nll = req.prompt_nll_sum / (len(req.prompt_ids) - 1)
                if self.metrics:
                    self.metrics.prompt_scored(req, req.prompt_nll)
            self._sample_and_deliver([req], logits[None])

    def _decode_step(self) -> None:
        batch = sorted((r for r in self.running.values() if r.prefilled == len(r.prompt_ids)), key=lambda r: r.row)
        logits = self.runner.decode([r.row for r in batch], [r.pending for r in batch], [r.loops for r in batch])
        self.steps += 1
        if self.metrics:
            self.metrics.batch(len(batch))
        self._sample_and_deliver(batch, logits)

    def _sample_and_deliver(self, batch: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per row of logits (B, V), stream it, and retire rows that are done."""
        tokens = [sample_row(logits[i], r.params, r.generator) for i, r in enumerate(batch)]
        nll, entropy = token_stats(logits, torch.tensor(tokens, device=logits.device))
        now = time.perf_counter()
        for i, req in enumerate(batch):
            self._deliver(req, tokens[i], float(nll[i]), float(entropy[i]), now)

    def _deliver(self, req: Request, token: int, nll: float, entropy: float, now: float) -> None:
        first = req.first_token_at is None
        if first:
            req.first_token_at = now
        if self.metrics:
            self.metrics.token(req, None if first else now - req.last_token_at, nll, entropy, first)
        req.last_token_at = now
        if token == req.eos_token:
            self._finish(req, "stop")
            return
        req.n_tokens += 1
        req.nll_sum += nll
        piece = req.stream.push(token)
        self._emit(req, TokenEvent(req.n_tokens - 1, token, piece, nll, entropy))
        if req.stream.stopped:
            self._finish(req, "stop")
        elif req.n_tokens >= req.max_tokens:
            self._finish(req, "length")
        else:
            req.pending = token

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        if req.row >= 0:
            self.running.pop(req.row, None)
            self.prefilling = [r for r in self.prefilling if r is not req]
            self.runner.free(req.row)
            self.free_rows.append(req.row)
        tail = req.stream.finish() if req.stream is not None and reason != "abort" and not req.stream.stopped else ""
        end = time.perf_counter()
        ev = FinishEvent(
            finish_reason=reason, text=tail, prompt_tokens=len(req.prompt_ids), completion_tokens=req.n_tokens,
            ttft_s=None if req.first_token_at is None else req.first_token_at - req.arrival,
            e2e_s=end - req.arrival, prompt_nll=req.prompt_nll,
            token_nll=req.nll_sum / req.n_tokens if req.n_tokens else None,
        )
        if self.metrics:
            self.metrics.finished(req, ev)
        ttft = f"{ev.ttft_s:.3f}s" if ev.ttft_s is not None else "-"
        log.info("%s loops=%d prompt=%d tokens=%d finish=%s ttft=%s e2e=%.3fs tokens/s=%.1f", req.endpoint,
                 req.loops, ev.prompt_tokens, ev.completion_tokens, reason, ttft, ev.e2e_s, ev.tokens_per_s)
        self._emit(req, ev)

    def _emit(self, req: Request, event: Any) -> None:
        try:
            req.emit(event)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening any more
            req.aborted = True

    def _report(self) -> None:
        if self.metrics:
            running, waiting = self.counts()
            self.metrics.gauges(running, waiting, self.runner.usage())

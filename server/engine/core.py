"""Engine: owns the model runner and steps a continuous-depth batch, in its own thread or driven by the engine
process's loop (process.py).

Each turn is `schedule -> run -> postprocess` (nano-vllm's step):
- schedule (host only, scheduler.py): retire aborted requests, admit waiting ones into free KV-cache rows, pick at most
  `prefill_chunk` prompt tokens to prefill (several prompts batched in one forward; a long prompt is spread
  over turns so running streams keep getting tokens), and advance every decoding row by ONE loop: a row
  at loop n of its token runs loop n now; a row at its last loop also samples its next token this turn.
- run: the runner launches all of it without waiting for the device (runner.py).
- postprocess: detokenize, stream, stop and retire the rows sampled one turn earlier (on a GPU the host
  does this while the device runs the next turn; on a CPU right away).

So a loops-1 request gets a token every turn, a loops-6 one every sixth, in the same batch. A request whose
sampling or text handling fails ends alone with an error event; a failing forward aborts the batch and the
engine goes on. HTTP handlers never touch the model: they `submit` a Request whose `emit` callback hands
events to the handler's own asyncio queue.

    python -m pytest tests/test_server_engine.py -q
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from loopgpt.model import Tokenizer
from loopgpt.model.step import DRAFT, OUT_FIELDS, VERIFY

from ..logprobs import PromptScores, prompt_scores, top_pairs
from .plan import HeadOut, Pending
from .request import Adaptive, FinishEvent, Flight, Request, Row, Sampled, TokenEvent
from .runner import ModelRunner
from .scheduler import Scheduler

__all__ = ["Adaptive", "Engine", "FinishEvent", "NotAccepting", "PromptScores", "QueueFull", "Request",
           "TokenEvent"]

log = logging.getLogger("loopgpt.server")


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queue; the client should retry later (HTTP 429)."""


class NotAccepting(RuntimeError):
    """The engine is not running or is draining for shutdown (HTTP 503)."""


class Engine(Scheduler):
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, max_queue: int = 64,
                 metrics: Any = None, prompt_nll: float = 1.0, prefill_chunk: int = 128,
                 spec_batch_limit: int | None = None, cohorts: bool | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics  # a ServerMetrics or None
        # Prompt scoring (the prompt_nll metric) runs the head at every prompt position, the largest matmul of a
        # prefill on a real vocabulary: a fraction of requests is scored (every 1/fraction-th, no randomness).
        self.prompt_nll = float(prompt_nll)
        self.nll_credit = 0.0
        # Token-aligned cohorts: rows of one depth start their tokens together, so their head runs once per token
        # for all of them (on a CPU the head's weight is streamed from memory at every call, whatever its rows);
        # on a GPU a head call costs microseconds and a token started at once is worth more (docs/architecture.md).
        self.cohorts = (not runner.cuda) if cohorts is None else cohorts
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per turn, over all requests
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: dict[int, Row] = {}  # cache row -> admitted request, in admission order
        self.free_rows = list(range(runner.max_batch))[::-1]  # lowest last: pop() admits into the lowest free row
        # Turns launched but not yet postprocessed: one on a GPU (the host streams turn t-1 while the device
        # runs turn t), none on a CPU, where nothing would overlap.
        self.inflight: collections.deque[tuple[list[Sampled], Pending]] = collections.deque()
        # Auto drafting pauses while this many tokens are in flight: on a CPU a step's cost grows with its entries and
        # drafting stopped paying beyond batch 4 (`loopgpt bench --rows 9`); on a GPU a step costs about the same
        # up to dozens of entries (an estimate: not yet measured there).
        self.spec_batch_limit = spec_batch_limit or (32 if runner.cuda else 4)
        self.depth = 1 if runner.cuda else 0
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.accepting = False  # set by start (a thread) or by the engine process's loop
        self.stopping = False
        self.drain_deadline: float | None = None
        self.steps = 0  # decode steps run (one loop each), for tests and logs
        self.drafts = [0, 0]  # self-speculative drafts verified, and accepted
        self.seconds = dict.fromkeys(("schedule", "run", "postprocess"), 0.0)  # engine thread time per phase

    # ---- called from the HTTP side (any thread) ----

    def start(self) -> None:
        self.accepting = True
        self.thread = threading.Thread(target=self._loop, name="loopgpt-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        self.submit_all([req])

    def submit_all(self, reqs: list[Request]) -> None:
        """Queue requests (each with its siblings) all or none: lower `priority` first, ties in arrival order."""
        assert all(1 + len(r.siblings) <= self.runner.max_batch for r in reqs), "a group larger than the batch"
        with self.cond:
            if not self.accepting or self.stopping or self.drain_deadline is not None:
                raise NotAccepting("the server is not accepting requests (starting or shutting down); retry shortly")
            if len(self.waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            for req in reqs:
                at = next((i for i, w in enumerate(self.waiting) if w.priority > req.priority), len(self.waiting))
                self.waiting.insert(at, req)
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
        return len(self.rows), len(self.waiting)

    def waiting_by_priority(self) -> dict[int, int]:
        with self.cond:
            return dict(collections.Counter(r.priority for r in self.waiting))

    # ---- the engine thread ----

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self) -> None:
        with self.runner.context():
            while True:
                with self.cond:
                    while not (self.stopping or self.busy()):
                        self.cond.wait(0.5)
                    if self.stopping:
                        break
                self.step()
        self.shutdown()

    def busy(self) -> bool:
        return bool(self.waiting or self.rows or self.inflight)

    def step(self) -> None:
        """One turn, whoever drives the engine (its thread, or the engine process's loop)."""
        try:
            self._turn()
        except Exception:  # the forward failed (out of memory, a bug): end its batch, keep serving
            log.exception("engine step failed; aborting the requests in the batch")
            self.inflight.clear()
            for row in list(self.rows.values()):
                self._finish(row, "abort")
        self._report()

    def shutdown(self) -> None:
        """Every request still here ends with finish_reason abort."""
        self.inflight.clear()
        for row in list(self.rows.values()):
            self._finish(row, "abort")
        for req in list(self.waiting):
            self._finish_unadmitted(req)

    def _turn(self) -> None:
        t0 = time.perf_counter()
        self._retire_aborted()
        self._admit()
        plan, sampled = self._schedule()
        t1 = time.perf_counter()
        launched = bool(plan.prefill or plan.lanes or plan.samples)
        if launched:
            pending = self.runner.run(plan)
            if plan.lanes:
                self.steps += plan.repeat
                if self.metrics:
                    self.metrics.batch(len(plan.lanes))
            if pending is not None:
                self.inflight.append((sampled, pending))
        t2 = time.perf_counter()
        keep = self.depth if launched else 0  # with nothing new to launch, catch up completely
        while len(self.inflight) > keep:
            self._postprocess(*self.inflight.popleft())
        t3 = time.perf_counter()
        self._account(t1 - t0, t2 - t1, t3 - t2)
        if launched and log.isEnabledFor(logging.DEBUG):  # the turn timeline (`serve --log-level debug`)
            log.debug("turn: %d loop(s) x %d lanes, prefill %d tokens in %d chunk(s), %d head rows, %d prefix "
                      "loads; schedule %.1f run %.1f postprocess %.1f ms; %d waiting", plan.repeat, len(plan.lanes),
                      sum(len(c.ids) for c in plan.prefill), len(plan.prefill), len(plan.samples),
                      len(plan.prefix_loads), 1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2), len(self.waiting))

    def _account(self, schedule: float, run: float, postprocess: float) -> None:
        """Where the engine thread's time goes, per phase (on a CPU `run` is the model; on a GPU it is the launch
        and postprocess overlaps the device): the numbers that show what per-token host work costs."""
        for phase, seconds in (("schedule", schedule), ("run", run), ("postprocess", postprocess)):
            self.seconds[phase] += seconds
            if self.metrics:
                self.metrics.engine_time(phase, seconds)

    def _retire_aborted(self) -> None:
        past_deadline = self.drain_deadline is not None and time.perf_counter() >= self.drain_deadline
        with self.cond:
            gone = [r for r in self.waiting if r.aborted or past_deadline]
            for r in gone:
                self.waiting.remove(r)
        for req in gone:
            self._finish_unadmitted(req)
        for row in [r for r in self.rows.values() if r.req.aborted or past_deadline]:
            self._finish(row, "abort")

    def _stopped(self, row: Row, s: Sampled, value: float) -> bool:
        """An adaptive candidate's verdict: stop the token after `s.loops` loops (its K/V copied deeper next turn,
        its successor started) or let it loop on."""
        row.awaiting = False
        if not value < row.req.adaptive.tolerance:  # strictly below, as model/adaptive.py's `exits`
            return False
        row.flights = [f for f in row.flights if f.pos != s.pos]
        row.copies.append((s.pos, s.loops - 1))
        row.decided(s.pos)
        return True

    def _postprocess(self, sampled: list[Sampled], pending: Pending) -> None:
        """Deliver the tokens of one launched turn; a row whose output or text handling fails ends alone."""
        now = time.perf_counter()
        convergence = pending.convergence()
        for s, out in zip(sampled, pending.result(), strict=True):
            row = s.row
            if row.req.done or s.mode == DRAFT:  # finished after launch / a draft is checked at its token's end
                continue
            if s.entry >= 0 and not self._stopped(row, s, convergence[s.entry]):
                continue  # an adaptive token that loops on: its candidate token is not one
            if s.epoch != row.epoch:  # the head of a token built on a rejected draft: never a real token
                row.sampled -= 1
                continue
            if s.mode == VERIFY:
                self._verified(row, s.pos, bool(HeadOut(*out[:len(OUT_FIELDS)]).accepted))
            try:
                self._deliver(row, out, now, s.loops)
            except (RuntimeError, ValueError, KeyError, IndexError, UnicodeError) as e:
                log.exception("request failed while handling its token; ending it alone")
                self._finish(row, "error", f"the server failed to handle a generated token ({type(e).__name__})")

    def _verified(self, row: Row, pos: int, accepted: bool) -> None:
        """The token after `pos` met its draft: on a rejection the drafts in flight are discarded and the
        corrected token (already in its lane) starts over at loop 0."""
        row.spec.record(accepted)
        self.drafts[0] += 1
        self.drafts[1] += accepted
        if self.metrics:
            self.metrics.speculated(row.req, accepted)
        if accepted:
            return
        row.epoch += 1
        row.flights = [f for f in row.flights if f.pos <= pos]
        if row.needed(pos + 1):
            row.flights.append(Flight(pos + 1))

    def _deliver(self, row: Row, out: list[float], now: float, loops: int = 0) -> None:
        head = HeadOut(*out[:len(OUT_FIELDS)])
        token, nll, entropy = int(head.token), head.nll, head.entropy
        req = row.req
        if row.first_token_at is None and req.prompt_logprobs is not None and row.fork_of is None:
            row.prompt_scores = prompt_scores(self.runner.take_scores(row.index), req.prompt_logprobs)
        if not head.finite:
            self._finish(row, "error", "the model produced non-finite logits for this request; try other "
                                       "sampling settings or fewer loops")
            return
        if row.first_token_at is None:
            row.first_token_at = now
            # positions scored: all but the last for echo, the uncached ones for the metric alone (_lookup)
            n = len(req.prompt_ids) - 1 - ((row.fork_of or row).cached if req.prompt_logprobs is None else 0)
            if row.scored and n > 0:
                row.prompt_nll = head.prompt_nll / n
                if self.metrics:
                    self.metrics.prompt_scored(req, row.prompt_nll)
            if req.prompt_logprobs is not None:
                self._emit(req, (row.fork_of or row).prompt_scores or PromptScores([], []))
            if req.max_tokens == 0:  # echo alone: the prompt is scored, nothing is generated
                self._finish(row, "length")
                return
            itl = None
        else:
            itl = now - row.last_token_at
        if self.metrics:
            self.metrics.token(req, row.first_token_at - req.arrival if itl is None else None, itl, nll, entropy)
        row.last_token_at = now
        if loops:  # decoded (the first token comes from the prefill)
            row.looped, row.loops_used = row.looped + 1, row.loops_used + loops
            if self.metrics:
                self.metrics.looped(req, loops)
        if token == row.eos or token in req.stop_token_ids:
            self._finish(row, "stop")
            return
        row.n_tokens += 1
        row.nll_sum += nll
        piece = row.stream.push(token)
        top = top_pairs(out[len(OUT_FIELDS):], req.logprobs) if req.logprobs is not None else None
        self._emit(req, TokenEvent(row.n_tokens - 1, token, piece, nll, entropy, top))
        if row.stream.stopped:
            self._finish(row, "stop")
        elif row.n_tokens >= req.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: Row, reason: str, error: str | None = None) -> None:
        req = row.req
        if req.done:
            return
        req.done = True
        for child in row.children:  # choices not forked yet have no prompt of their own: they end with it
            if child.prefilled < len(child.req.prompt_ids):
                self._finish(child, reason, error)
        self.rows.pop(row.index, None)
        self.runner.free(row.index)
        self.free_rows.append(row.index)
        self.free_rows.sort(reverse=True)  # rows in use stay packed low: consecutive rows read K/V without a gather
        tail = row.stream.finish() if reason in ("stop", "length") and not row.stream.stopped else ""
        self._send_finish(req, reason, tail, row.n_tokens, row.first_token_at, row.prompt_nll,
                          row.nll_sum / row.n_tokens if row.n_tokens else None, error,
                          row.loops_used / row.looped if row.looped else None, row.cached)

    def _finish_unadmitted(self, req: Request) -> None:
        for r in (req, *req.siblings):
            if not r.done:
                r.done = True
                self._send_finish(r, "abort", "", 0, None, None, None, None, None)

    def _send_finish(self, req: Request, reason: str, tail: str, n_tokens: int, first_token_at: float | None,
                     prompt_nll: float | None, token_nll: float | None, error: str | None,
                     loops_per_token: float | None = None, cached: int = 0) -> None:
        end = time.perf_counter()
        ev = FinishEvent(finish_reason=reason, text=tail, prompt_tokens=len(req.prompt_ids),
                         completion_tokens=n_tokens, ttft_s=None if first_token_at is None else first_token_at
                         - req.arrival, e2e_s=end - req.arrival, prompt_nll=prompt_nll, token_nll=token_nll,
                         error=error, loops_per_token=loops_per_token, cached_tokens=cached)
        if self.metrics:
            self.metrics.finished(req, ev)
        ttft = f"{ev.ttft_s:.3f}s" if ev.ttft_s is not None else "-"
        log.info("%s loops=%s prompt=%d tokens=%d finish=%s ttft=%s e2e=%.3fs tokens/s=%.1f", req.endpoint,
                 req.loops or "auto", ev.prompt_tokens, ev.completion_tokens, reason, ttft, ev.e2e_s,
                 ev.tokens_per_s)
        self._emit(req, ev)

    def _emit(self, req: Request, event: Any) -> None:
        try:
            req.emit(event)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening any more
            req.aborted = True

    def usage(self) -> float:
        """Fraction of the KV cache's token positions holding a live request's tokens (host bookkeeping)."""
        used = sum(r.prefilled + r.sampled for r in self.rows.values())
        return used / (self.runner.max_batch * self.runner.cache.max_len)

    def _report(self) -> None:
        if self.metrics:
            running, waiting = self.counts()
            prefix = self.runner.prefix
            self.metrics.gauges(running, waiting, self.usage(), None if prefix is None else prefix.usage())
            self.metrics.waiting_priorities(self.waiting_by_priority())

"""The engine's scheduling policy: admission (priority, groups and their fairness rule), the prefill budget,
token-aligned cohorts, lockstep runs, and how each kind of token advances by one loop (plain, speculative,
adaptive). All of it decides on the host alone what the next turn runs, as a `StepPlan` for the runner.

`Scheduler` is the half of `Engine` (server/engine/core.py) that plans a turn; the other half launches it and
delivers its tokens.

    python -m pytest tests/test_server_engine.py tests/test_scheduler.py -q
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from loopgpt.model import TextStream, fresh_seed
from loopgpt.model.step import DRAFT, PLAIN, VERIFY

from .plan import Fork, PrefillChunk, Sample, StepPlan
from .prefix_cache import chain
from .request import Flight, Request, Row, Sampled
from .speculation import Speculation


class Scheduler:
    """Planning state and policy; `Engine` holds the rest (the runner, the thread, postprocess)."""

    runner: Any  # ModelRunner
    tokenizer: Any
    metrics: Any
    cond: threading.Condition
    waiting: collections.deque[Request]
    rows: dict[int, Row]
    free_rows: list[int]
    prompt_nll: float
    nll_credit: float
    cohorts: bool
    prefill_chunk: int
    spec_batch_limit: int

    def _admit(self) -> None:
        while self.free_rows:
            with self.cond:
                if not self.waiting:
                    return
                req, others = self.waiting[0], len(self.waiting) > 1 or bool(self.rows)
                group = [req, *req.siblings]
                # Fairness for groups (n choices): while others run or wait, a group takes at most half the rows;
                # the choices beyond that wait behind the requests queued now, as a group of their own that
                # prefills its prompt again. A group keeps its place (it is never starved) but holds up the
                # queue only until half the rows are free, not all of them.
                cap = max(1, self.runner.max_batch // 2) if others else len(group)
                take = min(len(group), cap)
                if len(self.free_rows) < take or self._behind(req):
                    return
                self.waiting.popleft()
                if take < len(group):
                    rest = group[take]
                    rest.siblings = group[take + 1:]
                    at = next((i for i, w in enumerate(self.waiting) if w.priority > rest.priority), len(self.waiting))
                    self.waiting.insert(at, rest)
            row = self._admit_one(req)
            if self.metrics:
                self.metrics.queued(req, time.perf_counter() - req.arrival)
            row.children = [self._admit_one(sibling, row) for sibling in group[1:take]]

    def _admit_one(self, req: Request, fork_of: Row | None = None) -> Row:
        index = self.free_rows.pop()
        seed = fresh_seed() if req.seed is None else req.seed
        eos = self.tokenizer.eot_token if req.eos_token is None else req.eos_token
        spec = None
        if req.speculative is not None and self.runner.lanes_per_row > 1:
            spec = Speculation(req.speculative, req.loops, self.runner.lanes_per_row - 1)
        row = self.rows[index] = Row(req, index, seed, eos, TextStream(self.tokenizer, req.stop), spec, fork_of=fork_of)
        row.scored = self._score_prompt() if fork_of is None else fork_of.scored
        if fork_of is None:
            self._lookup(row)
        banned = [t for t in (eos, *req.stop_token_ids) if t >= 0]  # eos is -1 with ignore_eos
        if req.min_tokens and banned:
            self.runner.ban(index, banned)
            row.bans = True
        return row

    def _cacheable(self, req: Request) -> bool:
        """Whether a request's prompt K/V are the prefix cache's to serve and keep: not an adaptive request's (its
        tokens stop at their own loops), not with a KV budget (the runner then has no cache)."""
        return self.runner.prefix is not None and req.adaptive is None

    def _behind(self, req: Request) -> bool:
        """Whether `req` waits for a prompt still being prefilled that starts like it (beyond what is cached): that
        prompt's blocks are kept when its prefill completes, a turn or a few later, and `req` then prefills only the
        rest. The prefill budget goes oldest prompt first, so `req` would hardly have started its own sooner; requests
        queued together with a common prefix (lm-eval's choices of one context, a load test's first wave) compute it
        once."""
        if not self._cacheable(req):
            return False
        filling = [r.keys for r in self.rows.values() if r.keys and r.prefilled < len(r.req.prompt_ids)]
        if not filling:
            return False
        cached = self.runner.prefix.blocks
        for key, _, _ in chain(req.prompt_ids[:len(req.prompt_ids) - 1]):
            entry = cached.get(key)
            if entry is None or entry.depth < req.loops:
                return any(key in keys for keys in filling)
        return False

    def _lookup(self, row: Row) -> None:
        """A new prompt's longest cached prefix: its positions are not prefilled again. A prompt whose logprobs
        are asked for (echo) takes no block computed deeper than it: its cached positions are scored from their
        states. One sampled for the prompt_nll metric scores only the positions it computes (scoring a cached
        prefix again would cost a head over every position, the largest matmul of a prefill on a real
        vocabulary, which the cache exists to save)."""
        req = row.req
        if not self._cacheable(req):
            return
        row.keys = {key for key, _, _ in chain(req.prompt_ids)}  # kept when its prefill completes (see _behind)
        blocks = self.runner.prefix.match(req.prompt_ids, req.loops, req.prompt_logprobs is not None)
        row.cached = row.prefilled = sum(len(b.ids) for b in blocks)
        row.load = blocks or None
        if self.metrics:
            self.metrics.prefix_cache_query(len(req.prompt_ids), row.cached)

    @staticmethod
    def _scored(row: Row) -> bool:
        """Whether the row's prefill scores its prompt: echo's prompt logprobs, or the sampled prompt_nll metric."""
        return row.scored or row.req.prompt_logprobs is not None

    def _score_prompt(self) -> bool:
        """Whether the next admitted prompt is scored for the prompt_nll metric: the first, then every
        1/prompt_nll-th one (none at 0, all at 1)."""
        self.nll_credit += self.prompt_nll
        if self.nll_credit > 0:
            self.nll_credit -= 1.0
            return True
        return False

    def _held(self) -> set[int]:
        """Depths whose cohort is inside a token: their rows waiting at loop 0 of a new token hold until it ends,
        so that every row of a depth starts its tokens in the same step (at most loops - 1 steps of waiting, once).
        Speculating and adaptive rows keep their own pace."""
        if not self.cohorts:
            return set()
        return {r.req.loops for r in self.rows.values()
                if r.decoding and r.spec is None and r.req.adaptive is None and any(f.loop > 0 for f in r.flights)}

    def _schedule(self) -> tuple[StepPlan, list[Sampled]]:
        """This turn's work, decided on the host alone: every token in flight advances one loop (a head after its
        last loop, and after its draft loop when its request speculates), then prompt chunks fill the prefill
        budget oldest first. Rows whose prompt completes sample their first token now and decode from the next
        turn on."""
        plan, sampled = StepPlan(), []
        in_flight = sum(len(r.flights) for r in self.rows.values())
        plan.repeat = self._lockstep()
        held = self._held()
        for _ in range(plan.repeat):
            for row in self.rows.values():
                if row.decoding and row.req.adaptive is not None:
                    self._advance_adaptive(row, plan, sampled)
                elif row.decoding and not (row.spec is None and row.req.loops in held
                                           and all(f.loop == 0 for f in row.flights)):
                    self._advance(row, plan, sampled, drafting=in_flight < self.spec_batch_limit)
        for row in self.rows.values():  # exited tokens' K/V into their deeper slots, before this turn's step
            plan.kv_copies.extend((row.index, pos, exit_loop, row.req.deepest) for pos, exit_loop in row.copies)
            row.copies.clear()
        budget = self.prefill_chunk
        for row in self.rows.values():
            prompt = row.req.prompt_ids
            if budget == 0 or row.prefilled == len(prompt) or row.fork_of is not None:
                continue
            start = row.prefilled
            end = min(len(prompt), start + budget)
            scored = row.req.prompt_logprobs is not None
            targets = (prompt[start + 1:end + 1]) if self._scored(row) else None
            adaptive = row.req.adaptive
            if row.load:
                plan.prefix_loads.append((row.index, row.load, row.req.loops, prompt[1:start + 1] if scored else None,
                                          scored))
                row.load = None
            plan.prefill.append(PrefillChunk(row.index, prompt[start:end], start, row.req.deepest, targets,
                                             None if adaptive is None else (adaptive.tolerance, adaptive.min_loops),
                                             scored))
            row.prefilled, budget = end, budget - (end - start)
            if end == len(prompt):
                if self._cacheable(row.req):
                    plan.prefix_stores.append((row.index, prompt, row.req.loops))
                self._start_decoding(row, plan, sampled)
                self._fork(row, plan, sampled)
        return plan, sampled

    def _start_decoding(self, row: Row, plan: StepPlan, sampled: list[Sampled]) -> None:
        """The prompt is in the cache: its first token is sampled at this turn's head."""
        n = len(row.req.prompt_ids)
        self._head(row, plan, sampled, n - 1, PLAIN)
        row.decided(n - 1)

    def _fork(self, row: Row, plan: StepPlan, sampled: list[Sampled]) -> None:
        """n > 1: the further choices get a copy of the prompt just prefilled and sample their first tokens now."""
        kids = [c for c in row.children if not c.req.done]
        if not kids:
            return
        n, lane = len(row.req.prompt_ids), self.runner.lane
        plan.forks.append(Fork(row.index, lane(row.index, n - 1), [c.index for c in kids],
                               [lane(c.index, n - 1) for c in kids], n))
        for child in kids:
            child.prefilled = n
            self._start_decoding(child, plan, sampled)

    def _lockstep(self) -> int:
        """Loops this turn may run back to back: all of them when every decoding row is one plain token at loop 0
        of the same depth and nobody waits (no row could get a token sooner, no newcomer is held up), on a
        runner whose steps are cheap to chain (eager, CPU); else 1. It saves the per-step host work that a
        batch in lockstep gains nothing from (batch 1 above all)."""
        if not self.runner.eager or self.runner.cuda or self.waiting:
            return 1
        rows = list(self.rows.values())
        if not rows or any(not r.decoding or r.spec is not None or r.req.adaptive is not None
                           or r.prefilled < len(r.req.prompt_ids) for r in rows):
            return 1
        if any(len(r.flights) != 1 or r.flights[0].loop != 0 for r in rows) or len({r.req.loops for r in rows}) != 1:
            return 1
        return rows[0].req.loops

    def _advance(self, row: Row, plan: StepPlan, sampled: list[Sampled], drafting: bool) -> None:
        """One loop for each of the row's tokens in flight, oldest first."""
        n, spec = row.req.loops, row.spec
        drafting = spec is not None and spec.active and (drafting or not spec.auto)
        lane = self.runner.lane
        for f in list(row.flights):  # a flight added below starts at the next step
            plan.entry(lane(row.index, f.pos), row.index, f.pos, f.loop)
            ran, f.loop = f.loop, f.loop + 1
            if ran == n - 1:  # the token is through all its loops: its successor is decided now
                row.flights.remove(f)
                has_draft = any(g.pos == f.pos + 1 for g in row.flights)
                self._head(row, plan, sampled, f.pos, VERIFY if has_draft else PLAIN, loops=n)
                row.decided(f.pos, successor=not has_draft)
            elif (drafting and ran == spec.k - 1 and f is row.flights[-1] and len(row.flights) <= spec.m
                  and row.needed(f.pos + 1)):
                self._head(row, plan, sampled, f.pos, DRAFT)  # the successor starts from this early guess
                row.flights.append(Flight(f.pos + 1))

    def _advance_adaptive(self, row: Row, plan: StepPlan, sampled: list[Sampled]) -> None:
        """One loop of an adaptive request's token (`loops: "auto"`). From `min_loops` on, the head runs after every
        loop as a candidate; the step's convergence value, read back with it, decides in postprocess whether the
        token stops (the candidate is its token) or loops on (the candidate is dropped). At the budget it stops.
        It waits for that verdict before its next loop (no wait on a CPU, one turn on a GPU)."""
        if row.awaiting:
            return
        f = row.flights[0]
        entry = plan.entry(self.runner.lane(row.index, f.pos), row.index, f.pos, f.loop)
        ran, f.loop = f.loop, f.loop + 1
        if ran == row.req.adaptive.max_loops - 1:  # the budget: it stops here whatever its state
            row.flights.remove(f)
            self._head(row, plan, sampled, f.pos, PLAIN, loops=ran + 1)
            row.decided(f.pos)
        elif ran + 1 >= row.req.adaptive.min_loops:
            plan.convergence = True
            self._head(row, plan, sampled, f.pos, PLAIN, loops=ran + 1, entry=entry)
            row.awaiting = True

    def _head(self, row: Row, plan: StepPlan, sampled: list[Sampled], pos: int, mode: int, loops: int = 0,
              entry: int = -1) -> None:
        """The head on the token at `pos` (its lane), its output token going to the lane of `pos + 1`."""
        lane, counter = self.runner.lane, pos + 1 - len(row.req.prompt_ids)
        plan.samples.append(Sample(lane(row.index, pos), lane(row.index, pos + 1), row.index, row.req.params,
                                   row.seed, counter, mode, ban=row.bans and counter < row.req.min_tokens,
                                   top=row.req.logprobs is not None))
        sampled.append(Sampled(row, row.epoch, mode, pos, loops, entry))


"""Scheduling policy (server/engine/scheduler.py): the fairness rule for groups, and token-aligned cohorts.

    python -m pytest tests/test_scheduler.py -q
"""

from __future__ import annotations

import threading
import time

import pytest
from loopgpt.model import SamplingParams, generate_tokens, load_checkpoint
from loopgpt.server.engine import Engine, FinishEvent, ModelRunner, Request, TokenEvent

GREEDY = SamplingParams(temperature=0.0)


class Timed:
    """Remembers a request's tokens and when it finished."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finished_at: float | None = None
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        if isinstance(ev, TokenEvent):
            self.tokens.append(ev.token_id)
        elif isinstance(ev, FinishEvent):
            self.finished_at = time.perf_counter()
            self.done.set()

    def wait(self) -> list[int]:
        assert self.done.wait(120), "request did not finish within 120 s"
        return self.tokens


class Counting(ModelRunner):
    """A real runner that counts the prompt chunks and forks it was asked to run."""

    prefills = forks = 0

    def run(self, plan):
        self.prefills += len(plan.prefill)
        self.forks += len(plan.forks)
        return super().run(plan)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return model, tokenizer


def test_a_group_takes_at_most_half_the_rows_while_others_wait(parts):
    """n = 4 on a 4-row batch with a short request queued behind it: the old rule (a group waits for all its rows,
    then holds them to the end) made the short request wait for the whole group; now two choices start at once,
    the short request takes a free row beside them, and the other two choices follow."""
    model, tokenizer = parts
    engine = Engine(ModelRunner(model, max_batch=4), tokenizer)
    ids, params = tokenizer.encode("Once upon a time"), SamplingParams(1.0)
    group = [Timed() for _ in range(4)]
    reqs = [Request(ids, 2, 24, params, emit=c, seed=40 + i, eos_token=-1) for i, c in enumerate(group)]
    reqs[0].siblings = reqs[1:]
    short = Timed()
    engine.start()
    try:
        with engine.cond:  # both queued before the engine looks
            engine.submit(reqs[0])
            engine.submit(Request(tokenizer.encode("The end."), 1, 3, GREEDY, emit=short, eos_token=-1))
        got = [c.wait() for c in group]
        short.wait()
        assert short.finished_at < min(c.finished_at for c in group)
        for i, tokens in enumerate(got):  # each choice is what a separate request with its seed samples
            alone = Timed()
            engine.submit(Request(ids, 2, 24, params, emit=alone, seed=40 + i, eos_token=-1))
            assert tokens == alone.wait(), i
    finally:
        engine.stop()


def test_alone_a_group_is_admitted_whole(parts):
    model, tokenizer = parts
    engine = Engine(Counting(model, max_batch=4), tokenizer)
    group = [Timed() for _ in range(4)]
    reqs = [Request(tokenizer.encode("Lily"), 2, 5, SamplingParams(1.0), emit=c, seed=i) for i, c in enumerate(group)]
    reqs[0].siblings = reqs[1:]
    engine.start()
    try:
        engine.submit(reqs[0])
        for c in group:
            c.wait()
        assert (engine.runner.prefills, engine.runner.forks) == (1, 1)  # one prefill, copied to the 3 other rows
    finally:
        engine.stop()


@pytest.mark.parametrize("cohorts", [True, False])
def test_cohorts_and_one_big_step_give_generate_tokens_greedy_output(parts, cohorts):
    """Rows of one depth arriving at different times: with cohorts a newcomer waits for its cohort's next token
    boundary; either way every request's greedy tokens are generate_tokens' (both scheduler modes)."""
    model, tokenizer = parts
    engine = Engine(ModelRunner(model, max_batch=4), tokenizer, cohorts=cohorts)
    engine.start()
    try:
        specs = [("Once upon a time", 6, 10), ("She loved to play", 6, 8), ("The end.", 3, 9), ("Lily ran", 6, 7)]
        timed = []
        for prompt, loops, n in specs:
            t = Timed()
            engine.submit(Request(tokenizer.encode(prompt), loops, n, GREEDY, emit=t, eos_token=-1))
            timed.append(t)
            time.sleep(0.01)  # arrive mid-token of the rows before
        for (prompt, loops, n), t in zip(specs, timed, strict=True):
            assert t.wait() == list(generate_tokens(model, tokenizer.encode(prompt), loops, n, GREEDY)), loops
    finally:
        engine.stop()

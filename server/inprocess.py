"""The serving engine driven in this process, without HTTP: how the benchmarks time the real decode path.

Requests are greedy and never stop early (no EOS), so every run decodes exactly the tokens asked for.

    python -c "from loopgpt.model import load_checkpoint; from loopgpt.server.inprocess import InProcess; \
m, t, _ = load_checkpoint('checkpoints/demo'); e = InProcess(m, t, 4); print(e.generate([([1, 2], 6, 8)])); e.close()"
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from loopgpt.model import SamplingParams, Tokenizer

from .engine import Adaptive, Engine, FinishEvent, ModelRunner, Request, TokenEvent
from .engine.speculation import SpecRequest

GREEDY = SamplingParams(temperature=0.0)


class Waiter:
    """An emit callback that keeps one request's tokens and signals its end."""

    def __init__(self, then: Any = None):
        self.tokens: list[int] = []
        self.finish: FinishEvent | None = None
        self.done = threading.Event()
        self.then = then  # called (in the engine thread) when the request ends

    def __call__(self, ev: Any) -> None:
        if isinstance(ev, TokenEvent):
            self.tokens.append(ev.token_id)
        elif isinstance(ev, FinishEvent):
            self.finish = ev
            self.done.set()
            if self.then is not None:
                self.then()


class InProcess:
    """An Engine + ModelRunner over `model`, started; `close()` stops it."""

    def __init__(self, model: Any, tokenizer: Tokenizer, max_batch: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False, cuda_graphs: bool = False,
                 prefill_chunk: int = 128, max_loops: int | None = None, lanes_per_row: int = 1,
                 spec_batch_limit: int | None = None, prefix_cache_bytes: int = 0):
        self.runner = ModelRunner(model, max_batch, device=device, dtype=dtype, compile=compile,
                                  cuda_graphs=cuda_graphs, max_loops=max_loops, lanes_per_row=lanes_per_row,
                                  prefix_cache_bytes=prefix_cache_bytes)
        if compile or cuda_graphs:
            with self.runner.context():
                self.runner.warmup()
        self.engine = Engine(self.runner, tokenizer, max_queue=1 << 20, prompt_nll=0.0,
                             prefill_chunk=prefill_chunk, spec_batch_limit=spec_batch_limit)
        self.engine.start()

    def close(self) -> None:
        self.engine.stop()

    def submit(self, prompt: list[int], loops: int, max_tokens: int, then: Any = None,
               speculative: SpecRequest | None = None, params: SamplingParams = GREEDY, seed: int | None = None,
               adaptive: Adaptive | None = None) -> Waiter:
        """`loops` is ignored when `adaptive` is given (its max_loops is the budget)."""
        waiter = Waiter(then)
        self.engine.submit(Request(list(prompt), None if adaptive else loops, max_tokens, params, emit=waiter,
                                   eos_token=-1, endpoint="bench", speculative=speculative, seed=seed,
                                   adaptive=adaptive))
        return waiter

    def generate(self, specs: list[tuple[list[int], int, int]], timeout: float = 600.0,
                 speculative: SpecRequest | None = None, adaptive: Adaptive | None = None
                 ) -> tuple[list[list[int]], float]:
        """(tokens of each (prompt, loops, max_tokens) request, wall seconds from submission to the last token)."""
        t0 = time.perf_counter()
        waiters = [self.submit(p, n, m, speculative=speculative, adaptive=adaptive) for p, n, m in specs]
        for w in waiters:
            if not w.done.wait(timeout):
                raise TimeoutError(f"a benchmark request did not finish within {timeout:.0f} s")
        return [w.tokens for w in waiters], time.perf_counter() - t0

    def closed_loop(self, prompt: list[int], loops_cycle: list[int], rows: int, max_tokens: int,
                    requests: int, timeout: float = 600.0) -> float:
        """Aggregate tokens/s with `rows` requests always in flight (a finished one is replaced at once, its loops
        taken in turn from `loops_cycle`), over `requests` requests after the first `rows` (warm-up) are done."""
        lock = threading.Lock()
        issued, finished = [0], [0]
        all_done = threading.Event()
        marks: dict[str, float] = {}
        tokens = [0]

        def next_one() -> None:
            with lock:
                finished[0] += 1
                if finished[0] == rows:
                    marks["start"] = time.perf_counter()
                if finished[0] > rows:
                    tokens[0] += max_tokens
                if finished[0] == rows + requests:
                    marks["end"] = time.perf_counter()
                    all_done.set()
                if issued[0] >= rows + requests + rows:
                    return
                n = loops_cycle[issued[0] % len(loops_cycle)]
                issued[0] += 1
            self.submit(prompt, n, max_tokens, then=next_one)

        for i in range(rows):
            issued[0] += 1
            self.submit(prompt, loops_cycle[i % len(loops_cycle)], max_tokens, then=next_one)
        if not all_done.wait(timeout):
            raise TimeoutError(f"the closed-loop benchmark did not finish within {timeout:.0f} s")
        # let the tail (requests issued after the measured ones) finish before the next contender runs
        deadline = time.perf_counter() + timeout
        while self.engine.counts() != (0, 0) and time.perf_counter() < deadline:
            time.sleep(0.01)
        return tokens[0] / (marks["end"] - marks["start"])

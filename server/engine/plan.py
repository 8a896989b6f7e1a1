"""What the engine hands the runner each turn (a `StepPlan` of prompt chunks, decode entries, head rows, forks)
and what comes back (`Pending`: the head's output rows, copied to the host without waiting).

    python -c "from loopgpt.server.engine.plan import StepPlan; help(StepPlan)"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from loopgpt.model import SamplingParams
from loopgpt.model.step import OUT_FIELDS, PLAIN


class HeadOut(NamedTuple):
    """One row of the head's output (model/step.py's OUT_FIELDS, by name), then the top log-probabilities."""

    token: float
    nll: float
    entropy: float
    finite: float
    prompt_nll: float  # the prompt's summed NLL, on a prompt's first token of a scored prompt
    accepted: float  # VERIFY rows: whether the draft met the sampled token


assert HeadOut._fields == OUT_FIELDS, "HeadOut must name model/step.py's output columns in order"

@dataclass
class PrefillChunk:
    row: int
    ids: list[int]  # prompt tokens start .. start + len(ids) - 1
    start: int
    loops: int
    targets: list[int] | None = None  # what each position predicts, with prompt scoring on
    adaptive: tuple[float, int] | None = None  # loops "auto": (tolerance, min_loops); `loops` is the budget
    scored: bool = False  # keep each target's log-probability and top alternatives (echo), see take_scores


@dataclass
class Sample:
    """A lane to run the head on after this step's loop: sampling parameters, RNG position, what to do."""

    src: int  # lane whose hidden state goes through the head
    dst: int  # lane that receives the token (the next token's lane)
    row: int  # cache row (for its prompt NLL)
    params: SamplingParams
    seed: int
    counter: int  # index of the token being sampled in its request
    mode: int = PLAIN  # PLAIN, DRAFT or VERIFY (model/step.py)
    ban: bool = False  # the row's banned tokens (see ModelRunner.ban) may not be sampled for this token
    top: bool = False  # report the top log-probabilities (the turn's head then computes them for every row)


@dataclass
class Fork:
    """After this turn's prefill: copy the prompt (K/V at positions < length, hidden state, prompt NLL) of cache
    row `src` to `rows`, so n choices of one prompt share its prefill."""

    src: int
    src_lane: int
    rows: list[int]
    lanes: list[int]
    length: int


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    lanes: list[int] = field(default_factory=list)  # decode entries, one loop each: lane, cache row, position, loop
    rows: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    loop: list[int] = field(default_factory=list)  # 0-based loop index each entry runs now
    samples: list[Sample] = field(default_factory=list)  # lanes through the head after this step
    repeat: int = 1  # >1: the entries (listed `repeat` times, loops 0..repeat-1) run as consecutive steps
    convergence: bool = False  # bring each entry's convergence value back (adaptive requests decide on it)
    kv_copies: list[tuple[int, int, int, int]] = field(default_factory=list)  # (row, pos, exit loop, budget)
    forks: list[Fork] = field(default_factory=list)  # prompts copied to further rows after the prefill
    # Prefix cache (prefix_cache.py): (row, blocks, loops, targets, table) copied into rows before the prefill (a
    # scored prompt's cached positions scored: see ModelRunner._load_prefix), and (row, prompt, loops) of prompts
    # completed by it, kept after it
    prefix_loads: list[tuple[int, list[Any], int, list[int] | None, bool]] = field(default_factory=list)
    prefix_stores: list[tuple[int, list[int], int]] = field(default_factory=list)

    def entry(self, lane: int, row: int, pos: int, loop: int) -> int:
        """Add a decode entry; returns its index (where its convergence value comes back)."""
        self.lanes.append(lane)
        self.rows.append(row)
        self.pos.append(pos)
        self.loop.append(loop)
        return len(self.lanes) - 1


@dataclass
class Pending:
    """Sampled tokens on their way back to the host."""

    host: torch.Tensor  # (>= n, len(OUT_FIELDS) + TOP_FIELDS) float32, pinned on CUDA; the top only when asked
    n: int
    event: Any = None  # torch.cuda.Event, or None when the copy was synchronous
    conv: torch.Tensor | None = None  # (>= entries,) float32: each decode entry's convergence value

    def result(self) -> list[list[float]]:
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        return self.host[: self.n].tolist()

    def convergence(self) -> list[float]:
        self.result()  # the same event covers both copies
        return [] if self.conv is None else self.conv.tolist()


"""Benchmark rows and their timing: warm-up excluded, repetitions summarised as median and spread.

    python -c "from loopgpt.loadtest.timing import repeat; print(repeat(lambda: sum(range(10**5)), 5))"
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


def repeat(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `reps` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns: list[Callable[[], object]], reps: int, warmup: int = 1) -> list[list[float]]:
    """Wall seconds of each fn, `reps` rounds of one call each in turn (after `warmup` untimed rounds).

    Taking turns spreads slow drifts of a shared machine (other jobs, clocks) evenly over the
    contenders instead of charging them all to whichever ran last.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class Row:
    """One benchmark comparison: `ours` against `base`, both samples of a rate or a time."""

    row: int
    name: str
    unit: str  # e.g. "tok/s" (higher is better) or "ms/step" (lower is better)
    ours_label: str
    base_label: str
    ours: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    target: float | None = None  # the ratio the issue asks for
    higher_is_better: bool = True
    skipped: str | None = None  # why the row did not run
    extra: dict = field(default_factory=dict)  # further measurements of the row (other baselines, ...)
    checkpoint: str = ""  # what it ran on (a checkpoint directory, or the CUDA row's own preset)
    dtype: str = ""  # the dtype every contender of the row ran at ("float32", "bfloat16", ...)

    @property
    def ratio(self) -> float | None:
        """ours/base for rates, base/ours for times: >1 always means ours is better."""
        if self.skipped or not self.ours or not self.base:
            return None
        o, b = med(self.ours), med(self.base)
        return o / b if self.higher_is_better else b / o

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["ours_median"] = med(self.ours) if self.ours else None
        d["base_median"] = med(self.base) if self.base else None
        d["met"] = None if self.ratio is None or self.target is None else self.ratio >= self.target
        return d


def cell(xs: list[float]) -> str:
    """`median [min-max]` of a sample, 3 significant digits."""
    if not xs:
        return "-"
    return f"{med(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"


def on(row: Row) -> str:
    """` on CHECKPOINT at DTYPE`, as far as the row knows them."""
    where = f" on {Path(row.checkpoint).name or row.checkpoint}" if row.checkpoint else ""
    return where + (f" at {row.dtype}" if row.dtype else "")


def table(rows: list[Row]) -> str:
    head = f"{'#':>2}  {'comparison':<44}{'ours':>26}{'baseline':>26}{'ratio':>8}{'target':>8}  met"
    lines = [head]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.row:>2}  {r.name:<44}  skipped: {r.skipped}{on(r)}")
            continue
        target = f"{r.target:.2f}" if r.target is not None else "-"
        met = "-" if r.target is None or r.ratio is None else ("yes" if r.ratio >= r.target else "NO")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"  # a row of measurements only (no contenders)
        lines.append(f"{r.row:>2}  {r.name:<44}{cell(r.ours):>26}{cell(r.base):>26}{ratio:>8}{target:>8}  {met}")
        lines.append(f"{'':>4}{r.unit}{on(r)}: ours = {r.ours_label}; baseline = {r.base_label}")
        for key, value in r.extra.items():
            lines.append(f"{'':>4}{key}: {value}")
    return "\n".join(lines)

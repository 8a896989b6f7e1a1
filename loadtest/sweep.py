"""`loopgpt loadtest --sweep` and `--mixed`: one closed-loop run per concurrency level (and per loops mix), each
summarised as aggregate tok/s, TTFT and ITL p50/p99, and the CPU the server used meanwhile, as a markdown table.

The server's CPU use in cores is (CPU seconds after - before) / wall seconds between the two reads of its
/metrics (probe.py), so 2.0 means two cores busy for the whole level.

    loopgpt loadtest --url http://127.0.0.1:8000 --endpoint completions --sweep 1,4,16,32 --rounds 4 \\
        --loops 6 --max-tokens 64 --temperature 0 --ignore-eos --prompt-tokens 32:64
    loopgpt loadtest --url http://127.0.0.1:8000 --endpoint completions --concurrency 16 --rounds 4 --mixed
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .depths import MIXED_LOOPS, depth_gain
from .probe import server_cpu_seconds
from .runner import LoadConfig, run_load
from .stats import RequestRecord, summarize, summarize_by_loops

MIXED = {n: 1.0 for n in MIXED_LOOPS}
DEEP = {max(MIXED_LOOPS): 1.0}


def parse_levels(text: str) -> list[int]:
    """`1,4,16,32` -> [1, 4, 16, 32] (concurrency levels, run in the order given)."""
    try:
        levels = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes concurrency levels such as 1,4,16,32, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--sweep takes concurrency levels >= 1 such as 1,4,16,32, got {text!r}")
    return levels


@dataclass
class Level:
    """One closed-loop run at a fixed concurrency and loops mix."""

    concurrency: int
    loops: dict[int, float]
    records: list[RequestRecord]
    duration: float  # first send to last response (what tok/s is over)
    wall: float  # between the two /metrics reads around the run (what CPU use is over)
    cpu_seconds: float | None  # the server's, over `wall`; None when its /metrics does not say

    @property
    def summary(self) -> dict:
        return summarize(self.records, self.duration)

    @property
    def cores(self) -> float | None:
        return None if self.cpu_seconds is None or self.wall <= 0 else self.cpu_seconds / self.wall

    def loops_label(self) -> str:
        return ",".join(str(n) for n in self.loops)

    def to_dict(self) -> dict:
        by_loops = summarize_by_loops(self.records, self.duration)["by_loops"]
        return {"concurrency": self.concurrency, "loops": self.loops_label(), "duration_s": self.duration,
                "wall_s": self.wall, "cpu_seconds": self.cpu_seconds, "cpu_cores": self.cores,
                "overall": self.summary, "by_loops": {str(n): s for n, s in by_loops.items()},
                "requests": [r.to_dict() for r in self.records]}


async def run_levels(base: LoadConfig, levels: list[int], mixes: list[dict[int, float]],
                     rounds: int | None) -> list[Level]:
    """Every level x mix in turn, after one untimed warm-up request. With `rounds`, each level sends
    rounds x concurrency requests; otherwise base.requests or base.duration bound each level."""
    headers = {"Authorization": f"Bearer {base.api_key}"} if base.api_key else {}
    out: list[Level] = []
    async with httpx.AsyncClient(headers=headers, timeout=30) as probe:
        # the first request of a fresh server pays one-off costs (allocation, first kernels): not in level 1
        await run_load(dataclasses.replace(base, concurrency=1, requests=1, duration=None, progress=False))
        for concurrency in levels:
            for mix in mixes:
                cfg = dataclasses.replace(base, concurrency=concurrency, loops_mix=mix,
                                          requests=rounds * concurrency if rounds else base.requests)
                before, t0 = await server_cpu_seconds(probe, cfg.urls), time.perf_counter()
                records, duration = await run_load(cfg)
                wall, after = time.perf_counter() - t0, await server_cpu_seconds(probe, cfg.urls)
                used = None if before is None or after is None else after - before
                out.append(Level(concurrency, mix, records, duration, wall, used))
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f}"


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def sweep_table(levels: list[Level]) -> str:
    """The markdown table of every level; `x first` is tok/s against the first level of the same loops mix."""
    first: dict[str, float | None] = {}
    lines = ["| streams | loops | requests (failed) | tok/s | x first | TTFT p50 / p99 ms | ITL p50 / p99 ms "
             "| server CPU (cores) | prompt tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        s = level.summary
        rate = s["tokens_per_s"]
        base = first.setdefault(level.loops_label(), rate)
        ratio = None if not rate or not base else rate / base
        prompts = [r.prompt_tokens for r in level.records if r.ok and r.prompt_tokens is not None]
        lines.append(
            f"| {level.concurrency} | {level.loops_label()} | {s['requests']} ({s['requests'] - s['ok']}) "
            f"| {_num(rate)} | {_num(ratio, '{:.2f}')} | {_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p99'])} "
            f"| {_ms(s['itl_s']['p50'])} / {_ms(s['itl_s']['p99'])} | {_num(level.cores, '{:.2f}')} "
            f"| {f'{min(prompts)}-{max(prompts)}' if prompts else '-'} |")
    return "\n".join(lines)


def mixed_pairs(levels: list[Level]) -> list[dict]:
    """Per concurrency that ran both: mixed {1,2,4,6} against all at the deepest, and the gain."""
    runs = {(lv.concurrency, lv.loops_label()): lv for lv in levels}
    out = []
    for concurrency in dict.fromkeys(lv.concurrency for lv in levels):
        mixed = runs.get((concurrency, ",".join(map(str, MIXED))))
        padded = runs.get((concurrency, ",".join(map(str, DEEP))))
        if mixed and padded:
            a, b = mixed.summary["tokens_per_s"], padded.summary["tokens_per_s"]
            out.append({"concurrency": concurrency, "mixed_tokens_per_s": a, "deep_tokens_per_s": b,
                        "gain": a / b if a and b else None, "theory": depth_gain(MIXED_LOOPS),
                        "mixed_itl_p50_s_by_loops": {
                            n: s["itl_s"]["p50"]
                            for n, s in summarize_by_loops(mixed.records, mixed.duration)["by_loops"].items()}})
    return out


def mixed_table(levels: list[Level]) -> str:
    """The mixed comparison as markdown, with ITL p50 by loops under the mixed load (latency should follow depth)."""
    lines = [f"| streams | mixed {{{','.join(map(str, MIXED))}}} tok/s | all at {max(DEEP)} tok/s | gain "
             f"(theory {depth_gain(MIXED_LOOPS):.2f}x) | ITL p50 ms by loops, mixed |", "|---|---|---|---|---|"]
    for pair in mixed_pairs(levels):
        itl = ", ".join(f"{n}: {_ms(v)}" for n, v in pair["mixed_itl_p50_s_by_loops"].items())
        lines.append(f"| {pair['concurrency']} | {_num(pair['mixed_tokens_per_s'])} | "
                     f"{_num(pair['deep_tokens_per_s'])} | {_num(pair['gain'], '{:.2f}x')} | {itl} |")
    return "\n".join(lines)


def write_sweep_json(path: str | Path, config: dict, levels: list[Level]) -> None:
    data = {"config": config, "levels": [lv.to_dict() for lv in levels], "mixed": mixed_pairs(levels)}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

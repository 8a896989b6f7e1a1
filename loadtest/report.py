"""The load test report: a per-loops table, a JSON file and a latency/quality-vs-loops PNG.

    loopgpt loadtest --url http://127.0.0.1:8000 --requests 40 --loops 1,2,4,6 --json out.json --plot out.png
"""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [  # (header, width, value from a summary)
    ("loops", 6, None),
    ("reqs", 6, lambda s: f"{s['requests']}"),
    ("err%", 6, lambda s: f"{100 * s['error_rate']:.1f}"),
    ("ttft p50/p90/p99 ms", 22, lambda s: _trio(s["ttft_s"])),
    ("itl p50/p90/p99 ms", 22, lambda s: _trio(s["itl_s"])),
    ("e2e p50/p90/p99 ms", 24, lambda s: _trio(s["e2e_s"])),
    ("tok/s", 8, lambda s: _num(s["tokens_per_s"], "{:.1f}")),
    ("tok/s/req", 10, lambda s: _num(s["stream_tokens_per_s"], "{:.1f}")),
    ("req/s", 7, lambda s: _num(s["requests_per_s"], "{:.2f}")),
    ("prompt nll", 11, lambda s: _num(s["prompt_nll"], "{:.3f}")),
    ("token nll", 10, lambda s: _num(s["token_nll"], "{:.3f}")),
]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _trio(p: dict) -> str:
    return "/".join(_num(p[k] * 1000 if p[k] is not None else None, "{:.0f}") for k in ("p50", "p90", "p99"))


def table(summary: dict) -> str:
    """The per-loops rows and an `all` row, aligned, as printed by `loopgpt loadtest`."""
    lines = ["".join(f"{h:>{w}}" for h, w, _ in COLUMNS)]
    rows = [(str(n), s) for n, s in summary["by_loops"].items()] + [("all", summary["overall"])]
    for name, s in rows:
        cells = [f"{name:>{COLUMNS[0][1]}}"] + [f"{fn(s):>{w}}" for _, w, fn in COLUMNS[1:]]
        lines.append("".join(cells))
    errors = summary["overall"]["errors"]
    if errors:
        lines.append("errors by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())))
    return "\n".join(lines)


def replica_table(by_replica: dict) -> str:
    """Who served the load: one row per replica (x-loopgpt-replica header, else the URL)."""
    width = max(len("replica"), *(len(name) for name in by_replica))
    lines = [f"{'replica':<{width}}  {'reqs':>6}  {'ok':>6}  {'tokens':>8}  {'tok/s':>8}"]
    for name, s in by_replica.items():
        lines.append(f"{name:<{width}}  {s['requests']:>6}  {s['ok']:>6}  {s['completion_tokens']:>8}  "
                     f"{_num(s['tokens_per_s'], '{:.1f}'):>8}")
    return "\n".join(lines)


def write_json(path: str | Path, config: dict, summary: dict, duration: float, records: list[dict]) -> None:
    """Config, per-loops summary, run wall time and every request record (for re-analysis)."""
    data = {"config": config, "duration_s": duration,
            "by_loops": {str(n): s for n, s in summary["by_loops"].items()},
            "overall": summary["overall"], "by_replica": summary.get("by_replica", {}), "requests": records}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def plot(path: str | Path, summary: dict, title: str = "loopgpt load test") -> None:
    """Two panels: latency percentiles vs loops, and mean NLL (prompt, sampled tokens) vs loops."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    loops = list(summary["by_loops"])
    rows = list(summary["by_loops"].values())
    fig, (lat, qual) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (key, label) in enumerate((("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_s", "e2e"))):
        for q, style in (("p50", "-o"), ("p90", "--")):  # one colour per metric, dashed for its p90
            ys = [r[key][q] * 1000 if r[key][q] is not None else float("nan") for r in rows]
            lat.plot(loops, ys, style, color=f"C{i}", label=f"{label} {q}")
    lat.set(xlabel="loops", ylabel="ms", title="latency vs loops", xticks=loops)
    lat.legend(fontsize=8)
    for key, label in (("prompt_nll", "prompt NLL"), ("token_nll", "sampled-token NLL")):
        qual.plot(loops, [r[key] if r[key] is not None else float("nan") for r in rows], "-o", label=label)
    qual.set(xlabel="loops", ylabel="mean NLL (nats/token)", title="quality vs loops", xticks=loops)
    qual.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

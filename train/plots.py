"""PNG plots for training: the loss curve of a run, quality against loop count, adaptive against fixed depth.

    python -c "from loopgpt.train.plots import plot_losses; plot_losses('runs/demo/log.jsonl', 'loss.png')"
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(log_path: str | Path, png_path: str | Path) -> None:
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train (sampled loops)", alpha=0.6)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val, max loops")
        ax.plot([r["step"] for r in val], [r["val_loss_1"] for r in val], "s--", label="val, 1 loop")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_quality(results: dict[str, dict], png_path: str | Path, title: str = "") -> None:
    """`results`: {label: {loops: loss}}; one line per label, loss against loops."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_loops in results.items():
        xs = sorted(int(k) for k in by_loops)
        ax.plot(xs, [by_loops[str(x)] if str(x) in by_loops else by_loops[x] for x in xs], "o-", label=label)
    ax.set_xlabel("loops")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def plot_adaptive(fixed: dict[int, float], adaptive: dict[str, dict[str, tuple[float, float]]],
                  png_path: str | Path, title: str = "") -> None:
    """Loss against (mean) loops per token, fixed loops against one line of points per adaptive series, and
    below it each point's difference from the fixed curve at the same mean loops (linear between depths).

    `fixed`: {loops: loss}; `adaptive`: {series label: {tolerance: (mean loops used, loss)}}."""
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    xs = sorted(fixed)
    ax.plot(xs, [fixed[x] for x in xs], "o-", color="black", label="fixed loops")
    dx.axhline(0.0, color="black", lw=1)
    for (label, points), marker in zip(adaptive.items(), "s^vDP*", strict=False):
        points = sorted(points.items(), key=lambda kv: kv[1][0])
        loops, losses = [p[0] for _, p in points], [p[1] for _, p in points]
        ax.plot(loops, losses, marker + "--", label=label, alpha=0.8)
        dx.plot(loops, np.asarray(losses) - np.interp(loops, xs, [fixed[x] for x in xs]), marker + "--", alpha=0.8)
        if len(adaptive) == 1:  # one series: label each point with its tolerance
            for tol, (mean_loops, loss) in points:
                ax.annotate(f"{tol}", (mean_loops, loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
    dx.set_xlabel("loops per token (mean)")
    ax.set_ylabel("held-out loss (nats/token)")
    dx.set_ylabel("minus fixed (nats)")
    ax.set_title(title, fontsize=9)
    for a in (ax, dx):
        a.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)

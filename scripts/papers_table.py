"""Table and plot for scripts/reproduce_papers.sh: one row per run, held-out loss per loop count.

    python scripts/papers_table.py runs/papers
"""

import json
import sys
from pathlib import Path

from loopgpt.model import load_checkpoint
from loopgpt.train.plots import plot_quality

out = Path(sys.argv[1])
RUNS = ["l1x1", "l1x2", "l2x1", "l1x4-fixed", "l1x4-sampled", "l1x4-poisson", "l1x4-maxheavy"]
rows, curves = [], {}
for run in RUNS:
    d = out / run
    model, _, evals = load_checkpoint(d)
    log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    train_loss = sum(r["loss"] for r in log[-10:]) / len(log[-10:])
    cfg = model.config
    held = {k: v["loss"] for k, v in evals["loops"].items()}
    curves[run] = held
    wall = json.loads((d / "wall.json").read_text())["wall_s"]
    rows.append(f"| {run} | {model.num_params():,} | {cfg.n_layer} | {cfg.max_loops} | "
                f"{cfg.extra['train']['loops_sampling']} | {train_loss:.3f} | {held[str(cfg.max_loops)]:.3f} | "
                + ", ".join(f"{k}: {v:.3f}" for k, v in held.items()) + f" | {wall} |")
print("| run | params | layers | loops | sampling | train loss (last 10 steps) | held-out loss at trained loops "
      "| held-out loss by loops | wall s |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
plot_quality(curves, out / "papers.png", "TinyStories held-out loss vs loops (same token budget)")

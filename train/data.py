"""Token shards written by `loopgpt prepare`, and the random batches and loop counts training draws.

Batches come from a torch.Generator whose state is saved with the training state, so a resumed run
reads exactly the batches the uninterrupted run would have read.

    python -c "from loopgpt.train.data import Shards; print(Shards('data/tinystories').meta)"
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

LOOP_SAMPLINGS = ("fixed", "uniform", "poisson-lognormal", "max-heavy")


class Shards:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing; make the data directory with `loopgpt prepare`")
        self.meta = json.loads(meta_path.read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.splits = {}
        for split in ("train", "val"):
            path = self.directory / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; make the data directory with `loopgpt prepare`")
            self.splits[split] = np.memmap(path, dtype=dtype, mode="r")

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator) -> tuple:
        """(x, y) of shape (B, T): random windows of the split, y shifted by one token."""
        data = self.splits[split]
        if len(data) <= block_size + 1:
            raise ValueError(f"{split} split has {len(data)} tokens, fewer than block_size + 2 ({block_size + 2})")
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[s : s + block_size].astype(np.int64) for s in starts]))
        y = torch.from_numpy(np.stack([data[s + 1 : s + 1 + block_size].astype(np.int64) for s in starts]))
        return x, y


def sample_loops(kind: str, max_loops: int, generator: torch.Generator, mean: float = 0.0, sigma: float = 0.5,
                 cap: int | None = None, overflow: float = 0.0, overflow_max: int = 0) -> int:
    """Loop count for one training step. Every rank seeds `generator` alike, so all ranks agree.

    With `overflow` > 0, that fraction of steps instead draws uniformly from max_loops + 1..overflow_max:
    depths past the last gate (which reuse it) are trained too, so serving them is not an extrapolation.
    With overflow 0 nothing extra is drawn, so the sequences below are unchanged.

    fixed: always max_loops (the papers). uniform: 1..max_loops. poisson-lognormal (Huginn):
    n = 1 + Poisson(exp(tau)), tau ~ Normal(log(mean - 1) - sigma^2 / 2, sigma), clipped to cap.
    max-heavy: max_loops 70% of the time, else uniform over 1..max_loops - 1: the trained depth gets
    most of the updates, the shallower exits stay usable.
    """
    if overflow > 0 and overflow_max > max_loops and float(torch.rand((), generator=generator)) < overflow:
        return int(torch.randint(max_loops + 1, overflow_max + 1, (1,), generator=generator))
    if kind == "fixed":
        return max_loops
    if kind == "uniform":
        return int(torch.randint(1, max_loops + 1, (1,), generator=generator))
    if kind == "poisson-lognormal":
        mean = mean or (max_loops + 1) / 2
        tau = torch.normal(math.log(max(mean - 1, 1e-3)) - sigma**2 / 2, sigma, (1,), generator=generator)
        n = 1 + int(torch.poisson(tau.exp(), generator=generator))
        return min(n, cap or max_loops)
    if kind == "max-heavy":
        u = float(torch.rand((), generator=generator))
        if u < 0.7 or max_loops == 1:
            return max_loops
        return int(torch.randint(1, max_loops, (1,), generator=generator))
    raise ValueError(f"--loops-sampling must be one of {', '.join(LOOP_SAMPLINGS)}, got {kind!r}")

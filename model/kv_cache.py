"""KVCache: preallocated keys and values, one slot per (outer loop, layer, inner loop) application.

A cache holds `batch_size` rows; each row is one sequence with its own length, so a serving engine
can keep unrelated requests in one cache, reset a finished row and reuse it at once.

    python -c "from loopgpt.model import KVCache, preset; c = KVCache(preset('tiny'), 4); print(c.k.shape)"
"""

from __future__ import annotations

import torch

from .config import LoopGPTConfig


class KVCache:
    def __init__(
        self,
        config: LoopGPTConfig,
        batch_size: int,
        max_len: int | None = None,
        loops: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.config = config
        self.max_len = max_len or config.block_size
        self.loops = loops or config.loop_cap  # deepest outer loop count this cache can serve
        if self.max_len > config.block_size:
            raise ValueError(f"KV cache length {self.max_len} exceeds the context of {config.block_size} tokens")
        if not 1 <= self.loops <= config.loop_cap:
            raise ValueError(f"KV cache loops must be in 1..{config.loop_cap}, got {self.loops}")
        shape = (config.kv_slots(self.loops), batch_size, config.n_head, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (S, R, H, T, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Mark rows empty; their stale K/V are never read because attention masks by position."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0

    def write(self, slot: int, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, H, T, D) for cache rows `rows` (B,) at positions `pos` (B, T)."""
        self.k[slot][rows[:, None], :, pos] = k.transpose(1, 2)  # index (B, T) + (H, D)
        self.v[slot][rows[:, None], :, pos] = v.transpose(1, 2)

    def read(self, slot: int, rows: torch.Tensor | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `length` positions of `rows`: (B, H, length, D) each.

        `rows` may be a slice (see `row_index`): then the result is a view, with no gather copy."""
        return self.k[slot][rows, :, :length], self.v[slot][rows, :, :length]

    @staticmethod
    def row_index(rows: torch.Tensor) -> torch.Tensor | slice:
        """`rows` as a slice when it is a run of consecutive rows (the common case), else unchanged."""
        first, n = int(rows[0]), rows.numel()
        if bool((rows == torch.arange(first, first + n, device=rows.device)).all()):
            return slice(first, first + n)
        return rows

    def usage(self) -> float:
        """Fraction of the cache's token positions in use, for the kv_cache_usage_ratio gauge."""
        return float(self.lengths.sum()) / (self.batch_size * self.max_len)

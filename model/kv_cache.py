"""KVCache: preallocated keys and values, one slot per (outer loop, layer, inner loop) application.

A cache holds `batch_size` rows; each row is one sequence with its own length, so a serving engine
can keep unrelated requests in one cache, reset a finished row and reuse it at once. `CacheAccess`
says where one outer loop of a batch reads and writes: every row may stand at its own loop (its own
slots), which is what the continuous-depth engine step needs.

    python -c "from loopgpt.model import KVCache, preset; c = KVCache(preset('tiny'), 4); print(c.k.shape)"
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def slots(self) -> int:
        return self.k.shape[0]

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Mark rows empty; their stale K/V are never read because attention masks by position."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0

    def copy_rows(self, src: int, dst: torch.Tensor, length: int) -> None:
        """Copy the K/V of row `src` at positions < `length`, every slot, into rows `dst` ((N,) long): a prompt
        prefilled once serves several choices (n > 1). On the device, nothing read back."""
        self.k[:, dst, :, :length] = self.k[:, src, None, :, :length]  # (S, N, H, length, D)
        self.v[:, dst, :, :length] = self.v[:, src, None, :, :length]

    def write(self, slot: int | torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v (B, H, T, D) at positions `pos` (B, T) of cache rows `rows` ((B,) or per token (B, T)).

        `slot` is one slot for the whole batch, or one per batch row ((B,) tensor)."""
        rows = rows[:, None] if rows.dim() == 1 else rows  # (B, 1) or (B, T)
        slot = slot if isinstance(slot, int) else slot[:, None]  # broadcasts with rows and pos
        # One index_put on the whole buffer (not on a view of it): torch.compile then updates it in place.
        self.k[slot, rows, :, pos] = k.transpose(1, 2)  # index (B, T) + (H, D)
        self.v[slot, rows, :, pos] = v.transpose(1, 2)

    def read(self, slot: int | torch.Tensor, rows: torch.Tensor | slice,
             length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `length` positions of `rows`: (B, H, length, D) each.

        With one slot and `rows` a slice (see `row_index`) the result is a view, with no gather copy;
        with one slot per row ((B,) tensor) it is one gather of each row's own slot."""
        if isinstance(slot, int):
            return self.k[slot][rows, :, :length], self.v[slot][rows, :, :length]
        assert isinstance(rows, torch.Tensor), "per-row slots need the rows as a tensor"
        return self.k[slot, rows, :, :length], self.v[slot, rows, :, :length]

    @staticmethod
    def row_index(rows: torch.Tensor) -> torch.Tensor | slice:
        """`rows` as a slice when it is a run of consecutive rows (the common case), else unchanged.

        Reads the rows back to the host: for the reference forward, not for the engine's decode step."""
        first, n = int(rows[0]), rows.numel()
        if bool((rows == torch.arange(first, first + n, device=rows.device)).all()):
            return slice(first, first + n)
        return rows

    def usage(self) -> float:
        """Fraction of the cache's token positions in use, for the kv_cache_usage_ratio gauge."""
        return float(self.lengths.sum()) / (self.batch_size * self.max_len)


@dataclass
class CacheAccess:
    """Where one outer loop of a batch writes its new K/V and reads keys from a KVCache.

    `loop` is the outer loop of every row (an int) or of each row ((B,) tensor): a row's slots for
    layer i, inner loop j are `config.slot(loop, i, j)`, computed on the device when per row.
    """

    cache: KVCache
    loop: int | torch.Tensor  # outer loop index, for all rows or per row (B,)
    rows: torch.Tensor | slice  # (B,) cache row each batch row reads (a slice when consecutive)
    write_rows: torch.Tensor  # (B,) or (B, T): cache row each new token's K/V goes to (padding: a scratch row)
    pos: torch.Tensor  # (B, T) absolute positions of the new tokens
    ctx: int  # keys read per row: positions 0 .. ctx-1
    mask: torch.Tensor  # (B, 1, T, ctx) True where a query may attend to a key

    def __post_init__(self):
        cfg = self.cache.config
        per_loop = cfg.n_layer * cfg.inner_loops
        self.base: int | torch.Tensor = cfg.kept_loop(self.loop) * per_loop  # slot(n, 0, 0), per row when a tensor

    def write(self, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, H, T, D) of the application `offset` = layer * inner_loops + j of this loop."""
        self.cache.write(self.base + offset, self.write_rows, self.pos, k, v)

    def read(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.read(self.base + offset, self.rows, self.ctx)


def position_mask(pos: torch.Tensor, ctx: int) -> torch.Tensor:
    """(B, 1, T, ctx) bool: query at position p sees keys at positions 0..p of its own row."""
    return torch.arange(ctx, device=pos.device)[None, None, None, :] <= pos[:, None, :, None]

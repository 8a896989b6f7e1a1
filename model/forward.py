"""The one forward contract: embed -> loop_body x loops (each row at its own depth) -> head.

`LoopGPT` implements the three primitives in PyTorch, `loopgpt.export.runtime.OnnxRunner` with
onnxruntime; both get `forward` (and its checks) from here, so the two backends cannot drift.
The continuous-depth engine step (`model/step.py`) composes the same primitives one loop at a time.

    python -c "from loopgpt.model import LoopGPT, preset; import torch; \
print(LoopGPT(preset('tiny'))(torch.tensor([[1, 2, 3]]), [2])[0].shape)"
"""

from __future__ import annotations

from typing import Protocol

import torch

from .config import LoopGPTConfig
from .kv_cache import CacheAccess, KVCache, position_mask

Loops = int | list[int] | torch.Tensor | None


class LoopModel(Protocol):
    """What the engine, generation and the benchmarks need from a backend."""

    config: LoopGPTConfig

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """idx, pos (B, T) -> x (B, T, C)."""

    def loop_body(self, x: torch.Tensor, loop: int | torch.Tensor, access: CacheAccess | None) -> torch.Tensor:
        """One outer loop (every layer x inner loop, then the gated update) for x (B, T, C); `loop` is the
        0-based loop index of all rows (int) or of each row ((B,) tensor)."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> logits (B, T, V) in the model's dtype."""


def check_loops(config: LoopGPTConfig, loops: Loops, batch: int) -> list[int]:
    """Per-row loop counts as a host list; a sentence for anything outside 1..loop_cap."""
    cap = config.loop_cap
    if loops is None:
        loops = config.max_loops
    if isinstance(loops, torch.Tensor):
        if loops.shape != (batch,):
            raise ValueError(f"per-row loops must have shape ({batch},), got {tuple(loops.shape)}")
        loops = loops.tolist()
    if isinstance(loops, int) and not isinstance(loops, bool):
        loops = [loops] * batch
    if not isinstance(loops, list) or len(loops) != batch or not all(isinstance(n, int) for n in loops):
        raise ValueError(f"loops must be an int or {batch} ints, got {loops!r}")
    bad = [n for n in loops if not 1 <= n <= cap]
    if bad:
        raise ValueError(f"loops must be in 1..{cap}, got {bad[0]}")
    return loops


def hidden(model: LoopModel, idx: torch.Tensor, loops: Loops = None, kv_cache: KVCache | None = None,
           rows: torch.Tensor | None = None, pos: torch.Tensor | None = None,
           write_rows: torch.Tensor | None = None, ctx: int | None = None) -> torch.Tensor:
    """The last loop's hidden states (B, T, C), every row at its own depth; the cache lengths do not move.

    With `kv_cache`, batch row b is cache row `rows[b]` (default b) and new tokens sit at `pos` (default:
    right after each row's cached length). `write_rows` (B, T) sends some tokens' K/V elsewhere (padding: a
    scratch row) and `ctx` is the number of key positions read; the engine passes both, and `pos`, from its
    host-side bookkeeping, so this reads nothing back. Left out, they are computed, with a sync or two."""
    cfg = model.config
    B, T = idx.shape
    row_loops = check_loops(cfg, loops, B)
    access, views = None, ctx is None  # the reference path may read rows back to make cache reads views
    if kv_cache is not None:
        rows = torch.arange(B, device=idx.device) if rows is None else rows
        if pos is None:
            pos = kv_cache.lengths[rows][:, None] + torch.arange(T, device=idx.device)  # (B, T)
        if max(row_loops) > kv_cache.loops:
            raise ValueError(f"KV cache holds {kv_cache.loops} loops, {max(row_loops)} requested")
        ctx = int(pos.max()) + 1 if ctx is None else ctx
        if ctx > kv_cache.max_len:
            raise ValueError(f"position {ctx - 1} is beyond the KV cache length {kv_cache.max_len}")
        write_rows = rows if write_rows is None else write_rows
    elif pos is None:
        pos = torch.arange(T, device=idx.device)[None, :].expand(B, T)
    if T > cfg.block_size or (ctx or int(pos.max()) + 1) > cfg.block_size:
        raise ValueError(f"sequence reaches position {int(pos.max())}, beyond the context of {cfg.block_size}")

    x = model.embed(idx, pos)  # (B, T, C)
    mask = None if kv_cache is None else position_mask(pos, ctx)
    read_all = KVCache.row_index(rows) if kv_cache is not None and views else rows  # once: it may read rows back
    for n in range(max(row_loops)):
        active = [b for b in range(B) if row_loops[b] > n]
        whole = len(active) == B
        sel = None if whole else torch.tensor(active, device=idx.device)
        if kv_cache is not None:
            r, w, p, m = (rows, write_rows, pos, mask) if whole else (rows[sel], write_rows[sel], pos[sel], mask[sel])
            read = read_all if whole else KVCache.row_index(r) if views else r
            access = CacheAccess(kv_cache, n, read, w, p, ctx, m)
        xa = model.loop_body(x if whole else x[sel], n, access)
        x = xa if whole else x.index_copy(0, sel, xa)
    return x


def forward(model: LoopModel, idx: torch.Tensor, loops: Loops = None, kv_cache: KVCache | None = None,
            rows: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the whole model (see `hidden`); the cache lengths advance past the new tokens.

    The reference path: generation, evaluation, export parity and the tests' oracles."""
    if kv_cache is not None:
        rows = torch.arange(idx.shape[0], device=idx.device) if rows is None else rows
        if pos is None:
            pos = kv_cache.lengths[rows][:, None] + torch.arange(idx.shape[1], device=idx.device)  # (B, T)
    x = hidden(model, idx, loops, kv_cache, rows, pos)
    if kv_cache is not None:
        kv_cache.lengths[rows] = pos[:, -1] + 1
    return model.head(x)

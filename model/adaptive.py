"""Per-token adaptive depth: every token stops looping on its own once its state has converged.

The policy, which the serving engine's `loops: "auto"` follows so that evaluation and serving agree:

- After outer loop n (0-based, so n + 1 loops used) a token's state moved from x_n to x_{n+1}; its
  convergence value is `convergence(model, x_n, x_{n+1}, measure)`:
    "hidden"   ||x_{n+1} - x_n|| / ||x_{n+1}||   (relative change of the residual stream; no head needed)
    "cosine"   1 - cos(x_n, x_{n+1})   (change of direction only; no head needed)
    "kl"       KL(p_{n+1} || p_n) in nats, p_n = softmax(head(x_n))   (a head per loop, and the previous one's)
    "entropy"  H(p_{n+1}) in nats   (stop once confident; a head per loop)
- The token exits after loop n when n + 1 = max_loops (the budget), or when n + 1 >= min_loops and its value
  is strictly below `tol` (`exits`). So `tol = 0` never exits early: every token runs max_loops.
- K/V of an exited token (`copy_exit_kv`): its exit loop's K/V are copied into every deeper slot of its
  position, so tokens still looping attend at every deeper loop to the last K/V it computed (Huginn's
  "latest", CDB's `last_exited`). Its final hidden state is x_{n+1}, which goes to the head.

A token's exit therefore depends only on its own trajectory and on the earlier tokens' K/V at the same loop:
the teacher-forced `adaptive_hidden` (loop by loop over a whole sequence) equals decoding token by token.

For the engine's decode step: keep each row's state before the loop (at loop 0, the token's embedding), take
`convergence(model, before, after, measure)` and `exits(...)` for the rows, and for the rows that stop after
loop n call `copy_exit_kv(cache, rows, pos, n, budget)` once per distinct n. Which rows stopped has to come
back to the host (one small copy per step, like the sampled tokens). Prefill: `adaptive_hidden` with the
serving cache, rows, positions, padding write rows and a scratch row. A KV budget (`kv_budget`) is refused
(`check_adaptive`, which the server's admission uses too).

    python -c "from loopgpt.model import LoopGPT, preset; from loopgpt.model.adaptive import adaptive_hidden; \
import torch; x, n = adaptive_hidden(LoopGPT(preset('tiny')).eval(), torch.tensor([[1, 2, 3]]), 0.1); print(n)"
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .config import LoopGPTConfig
from .forward import LoopModel
from .generate import RequestError
from .kv_cache import CacheAccess, KVCache, position_mask

MEASURES = ("hidden", "cosine", "kl", "entropy")
DEFAULT_MEASURE = "cosine"  # the best at equal decode cost on valid.txt (docs/results.md)


def check_adaptive(config: LoopGPTConfig, tol: float, max_loops: int | None = None, min_loops: int = 1,
                   measure: str = DEFAULT_MEASURE) -> tuple[int, int]:
    """(max_loops, min_loops) with max_loops defaulting to the trained one; otherwise a RequestError sentence
    naming the setting at fault (the server's 400 names the same field)."""
    max_loops = config.max_loops if max_loops is None else max_loops
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not math.isfinite(tol) or tol < 0:
        raise RequestError(f"tolerance must be a finite number >= 0, got {tol!r}", "tolerance")
    if isinstance(max_loops, bool) or not isinstance(max_loops, int) or not 1 <= max_loops <= config.loop_cap:
        raise RequestError(f"max_loops must be in 1..{config.loop_cap} (the checkpoint's loop cap), got "
                           f"{max_loops!r}", "max_loops")
    if isinstance(min_loops, bool) or not isinstance(min_loops, int) or not 1 <= min_loops <= max_loops:
        raise RequestError(f"min_loops must be in 1..{max_loops} (max_loops), got {min_loops!r}", "min_loops")
    if measure not in MEASURES:
        raise RequestError(f"convergence measure must be one of {', '.join(MEASURES)}, got {measure!r}", "measure")
    if config.kv_budget:
        # With slots shared across loops, decoding reads earlier tokens' K/V of *deeper* loops, which a
        # loop-by-loop pass over the whole sequence has not computed yet: the two would not agree.
        raise RequestError(f"adaptive depth (loops \"auto\") needs one K/V slot per loop; this model shares slots "
                           f"(kv_budget {config.kv_budget})", "loops")
    return max_loops, min_loops


def convergence(model: LoopModel, old: torch.Tensor, new: torch.Tensor, measure: str = DEFAULT_MEASURE
                ) -> torch.Tensor:
    """Convergence value of each token whose state went from `old` to `new` (..., C): float32 (...).

    "hidden" and "cosine" need no head; "kl" runs the head on both states, "entropy" on `new` (module docstring)."""
    if measure == "hidden":
        old, new = old.float(), new.float()
        # the epsilon only guards an all-zero state; real states have norms of order sqrt(C)
        return torch.linalg.vector_norm(new - old, dim=-1) / torch.linalg.vector_norm(new, dim=-1).clamp_min(1e-12)
    if measure == "cosine":
        return 1.0 - F.cosine_similarity(old.float(), new.float(), dim=-1)
    logp = F.log_softmax(model.head(new).float(), dim=-1)  # (..., V)
    if measure == "entropy":
        return -(logp.exp() * logp).sum(-1)
    if measure == "kl":
        old_logp = F.log_softmax(model.head(old).float(), dim=-1)
        return (logp.exp() * (logp - old_logp)).sum(-1)
    raise ValueError(f"convergence measure must be one of {', '.join(MEASURES)}, got {measure!r}")


def exits(value: torch.Tensor, loops_done: int | torch.Tensor, tol: float, min_loops: int, max_loops: int
          ) -> torch.Tensor:
    """Bool (...): which tokens stop after `loops_done` loops, given their convergence `value` (...)."""
    loops_done = torch.as_tensor(loops_done, device=value.device)
    # strictly below: tol = 0 never stops a token early, so it is exactly the fixed-depth model at max_loops
    return (loops_done >= max_loops) | ((loops_done >= min_loops) & (value < tol))


def copy_exit_kv(cache: KVCache, rows: int | torch.Tensor, pos: int | torch.Tensor, exit_loop: int,
                 loops: int) -> None:
    """Copy the K/V of tokens that exited after loop `exit_loop` into their slots of every deeper loop < `loops`.

    `rows`, `pos`: one token (ints) or K tokens ((K,) long tensors), all with the same exit loop; `loops` is the
    deepest loop count anything in those rows may still run (the request's budget). With a KV budget the deeper
    loops' slots are the other shared slots (`config.kept_loop`), so every one of them ends up holding the exit
    loop's K/V."""
    cfg = cache.config
    if not 0 <= exit_loop < loops <= cache.loops:
        raise ValueError(f"exit loop {exit_loop} and loops {loops} must satisfy 0 <= exit < loops <= {cache.loops}")
    per_loop = cfg.n_layer * cfg.inner_loops  # a loop's slots are contiguous: slot(n, 0, 0) + layer * inner + j
    src = cfg.slot(exit_loop, 0, 0)
    targets = sorted({cfg.slot(n, 0, 0) for n in range(exit_loop + 1, loops)} - {src})
    rows = torch.as_tensor(rows, device=cache.k.device).reshape(-1)  # (K,)
    pos = torch.as_tensor(pos, device=cache.k.device).reshape(-1)  # (K,)
    for buf in (cache.k, cache.v):
        kv = buf[src : src + per_loop, rows, :, pos]  # (K, L, H, D): the two index tensors' dim comes first
        for dst in targets:
            buf[dst : dst + per_loop, rows, :, pos] = kv


def adaptive_hidden(model: LoopModel, idx: torch.Tensor, tol: float, max_loops: int | None = None,
                    min_loops: int = 1, measure: str = DEFAULT_MEASURE, kv_cache: KVCache | None = None,
                    rows: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                    write_rows: torch.Tensor | None = None, scratch: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced adaptive depth for the tokens idx (B, T): every token loops until it exits (`exits`).

    Returns the hidden states (B, T, C), each token's after its own last loop, and the loops each token used
    (B, T) long, in 1..max_loops. Loop by loop over all the tokens at once: exited tokens still go through the
    stack (one batched call), but their K/V go to a scratch row, so their own row keeps the exit loop's K/V
    that `copy_exit_kv` put in the deeper slots.

    Without `kv_cache`, idx holds whole sequences from position 0 and a private cache is used. With it (a
    prompt chunk appended to a serving cache), batch row b is cache row `rows[b]` (default b), the tokens sit
    at `pos` (B, T) (default: after each row's cached length), `write_rows` (B, T) sends some tokens' K/V
    elsewhere (padding), and `scratch` is a row nothing reads. The cache lengths do not move, as in `hidden`."""
    cfg = model.config
    max_loops, min_loops = check_adaptive(cfg, tol, max_loops, min_loops, measure)  # a KV budget is refused
    B, T = idx.shape
    dev = idx.device
    if kv_cache is None:
        pos = torch.arange(T, device=dev)[None, :].expand(B, T)  # (B, T)
    else:
        rows = torch.arange(B, device=dev) if rows is None else rows
        pos = kv_cache.lengths[rows][:, None] + torch.arange(T, device=dev) if pos is None else pos  # (B, T)
        if scratch is None or kv_cache.loops < max_loops:
            raise ValueError(f"a KV cache for adaptive depth needs a scratch row and {max_loops} loops")
    ctx = int(pos.max()) + 1
    if ctx > cfg.block_size:
        raise ValueError(f"sequence reaches position {ctx - 1}, beyond the context of {cfg.block_size}")
    x = model.embed(idx, pos)  # (B, T, C)
    if kv_cache is None:
        kv_cache, rows, scratch = KVCache(cfg, B + 1, max_len=T, loops=max_loops, device=dev, dtype=x.dtype), None, B
    own = (torch.arange(B, device=dev) if rows is None else rows)[:, None].expand(B, T)  # (B, T) cache row per token
    own = own if write_rows is None else write_rows
    read = slice(0, B) if rows is None else KVCache.row_index(rows)
    access = CacheAccess(kv_cache, 0, read, own, pos, ctx, position_mask(pos, ctx))
    active = torch.ones(B, T, dtype=torch.bool, device=dev)
    used = torch.zeros(B, T, dtype=torch.long, device=dev)
    for n in range(max_loops):
        access = dataclasses.replace(access, loop=n, write_rows=torch.where(active, own, scratch))
        new = model.loop_body(x, n, access)
        value = convergence(model, x, new, measure)  # (B, T)
        x = torch.where(active[..., None], new, x)
        used += active
        done = active & exits(value, n + 1, tol, min_loops, max_loops)
        active &= ~done
        b, t = done.nonzero(as_tuple=True)
        if b.numel() and n + 1 < max_loops:
            # Also for the last tokens to stop: a serving cache's later tokens may loop deeper than this chunk did.
            copy_exit_kv(kv_cache, own[b, t], pos[b, t], n, max_loops)
        if not bool(active.any()):
            break
    return x, used

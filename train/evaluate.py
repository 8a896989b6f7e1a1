"""Held-out loss and perplexity per loop count: sliding windows over a whole file, deterministic.

Each token is scored once, with as much left context as the window allows (stride = half the
context, as is usual for perplexity with a fixed-length model). Besides fixed loop counts: per-token
adaptive depth (`loops auto`, model/adaptive.py: loss and mean loops used per tolerance), and decoding token
by token through the KV cache, which is what a KV budget (K/V slots shared across loops) changes.

    loopgpt eval --checkpoint checkpoints/demo --data ../shared/data/tinystories/heldout.txt --loops 1,2,4,6
    loopgpt eval --checkpoint checkpoints/demo --data ../shared/data/tinystories/heldout.txt --loops auto \
        --tolerance 0.05,0.1,0.2 --max-tokens 50000
    loopgpt eval --checkpoint checkpoints/demo --data ../shared/data/tinystories/heldout.txt --loops 6 --kv-budget 2
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loopgpt.model import KVCache, LoopGPT, LoopGPTConfig, Tokenizer
from loopgpt.model.adaptive import DEFAULT_MEASURE, adaptive_hidden
from loopgpt.model.forward import forward
from loopgpt.model.tokenizer import EOT
from tqdm import tqdm

LOG_EVERY_S = 60.0  # progress lines in a log file


def load_tokens(path: str | Path, tokenizer: Tokenizer, max_tokens: int = 0) -> torch.Tensor:
    """A text file (documents joined by EOT where it has <|endoftext|> markers) or a prepared .bin shard."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file does not exist")
    if path.suffix == ".bin":
        ids = np.fromfile(path, dtype=np.uint32 if tokenizer.n_vocab > 65535 else np.uint16).astype(np.int64)
    else:
        text = path.read_text(encoding="utf-8")
        docs = [d.strip("\n") for d in text.split(EOT) if d.strip()]
        ids = np.asarray([t for d in docs for t in tokenizer.encode_document(d)], dtype=np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{path}: fewer than 2 tokens to score")
    return torch.from_numpy(ids)


def windows(n: int, context: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window: inputs ids[begin:end-1], targets ids[begin+1:end], of which
    those at index >= first are scored. Windows advance by half the context."""
    stride, out, scored = max(1, context // 2), [], 1
    for begin in range(0, n, stride):
        end = min(begin + context + 1, n)
        out.append((begin, end, scored))
        scored = end
        if end == n:
            break
    return out


def window_batches(ids: torch.Tensor, context: int, batch_size: int, device, desc: str = "") -> Iterator[tuple]:
    """(inputs (B, T), targets (B, T)) per batch of equal-length windows; a target scored by an earlier window
    is -1. The short last window runs alone. With `desc`, a progress bar on a terminal (none in a log file)."""
    spans = windows(len(ids), context)
    groups = []
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        length = chunk[0][1] - chunk[0][0]
        groups += [[c] for c in chunk] if any(e - b != length for b, e, _ in chunk) else [chunk]
    for group in progress(groups, desc):
        x = torch.stack([ids[b : e - 1] for b, e, _ in group]).to(device)  # (B, T)
        y = torch.stack([ids[b + 1 : e] for b, e, _ in group]).clone()
        for row, (b, _, first) in enumerate(group):
            y[row, : first - 1 - b] = -1  # scored by an earlier window
        yield x, y.to(device)


def progress(items: list, desc: str, every_s: float = LOG_EVERY_S) -> Iterator:
    """`items`, with a progress bar on a terminal, or in a log file a line at most every `every_s` seconds (a bar's
    redraws would be thousands of lines there); nothing without `desc`."""
    if not desc:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, unit="batch", leave=False)
        return
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            print(f"{desc}: {i}/{len(items)} batches in {last - start:.0f} s", file=sys.stderr, flush=True)


def summed_nll(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(sum of NLL over the scored targets, their count), in float32 whatever the model's dtype."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
    return nll.item(), int((y >= 0).sum())


def _context(model: LoopGPT, context: int) -> int:
    return min(context or model.config.block_size, model.config.block_size)


@torch.no_grad()
def sliding_nll(model: LoopGPT, ids: torch.Tensor, loops: int, context: int = 0, batch_size: int = 8) -> tuple:
    """(sum of NLL, number of scored tokens) over `ids`: every token after the first, once."""
    total, count = 0.0, 0
    for x, y in window_batches(ids, _context(model, context), batch_size, model.lm_head.weight.device,
                               f"eval loops={loops}"):
        logits, _ = model(x, loops)
        nll, n = summed_nll(logits, y)
        total, count = total + nll, count + n
    return total, count


@torch.no_grad()
def sliding_nll_adaptive(model: LoopGPT, ids: torch.Tensor, tol: float, max_loops: int | None = None,
                         min_loops: int = 1, measure: str = DEFAULT_MEASURE, context: int = 0,
                         batch_size: int = 8) -> tuple:
    """(sum of NLL, number of scored tokens, sum of their loops used) with per-token adaptive depth."""
    total, count, loops = 0.0, 0, 0
    for x, y in window_batches(ids, _context(model, context), batch_size, model.lm_head.weight.device,
                               f"eval tolerance={tol:g}"):
        h, used = adaptive_hidden(model, x, tol, max_loops, min_loops, measure)
        nll, n = summed_nll(model.head(h), y)
        total, count, loops = total + nll, count + n, loops + int(used[y >= 0].sum())
    return total, count, loops


@torch.no_grad()
def sliding_nll_decode(model: LoopGPT, ids: torch.Tensor, loops: int, context: int = 0, batch_size: int = 32) -> tuple:
    """(sum of NLL, number of scored tokens) decoding every window one token at a time through a KVCache.

    What the engine's decode sees: with `model.config.kv_budget` = b, loop n of a token reads the earlier
    tokens' K/V of the latest loop sharing loop n's slot (`config.kept_loop`). Without a budget it equals
    `sliding_nll` up to rounding."""
    total, count = 0.0, 0
    for x, y in window_batches(ids, _context(model, context), batch_size, model.lm_head.weight.device,
                               f"eval loops={loops}, token by token"):
        B, T = x.shape
        cache = KVCache(model.config, B, max_len=T, loops=loops, device=x.device, dtype=model.lm_head.weight.dtype)
        logits = torch.cat([forward(model, x[:, t : t + 1], loops, cache) for t in range(T)], dim=1)  # (B, T, V)
        nll, n = summed_nll(logits, y)
        total, count = total + nll, count + n
    return total, count


def done(what: str, row: dict) -> None:
    """One line on stderr per finished loop count: the progress a log file gets (the bars are terminal-only)."""
    print(f"eval: {what}: loss {row['loss']:.4f} over {row['tokens']} tokens in {row['seconds']:.0f} s",
          file=sys.stderr, flush=True)


def kv_bytes_per_token(config: LoopGPTConfig, loops: int, dtype: torch.dtype) -> int:
    """K and V bytes one token keeps in a KVCache built for `loops` (the config's kv_budget applied)."""
    return config.kv_cache_bytes(1, 1, loops, torch.empty(0, dtype=dtype).element_size())


def evaluate_loops(model: LoopGPT, ids: torch.Tensor, loops_list: list[int], context: int = 0,
                   decode: bool = False) -> dict:
    """{"loops": {"N": {"loss", "ppl", "tokens", "kv_bytes_per_token", "seconds"}}} for each loop count; `decode` scores
    token by token through the cache (`sliding_nll_decode`), the only way a KV budget changes anything."""
    results = {}
    dtype = model.lm_head.weight.dtype
    for loops in loops_list:
        start = time.perf_counter()
        total, count = (sliding_nll_decode if decode else sliding_nll)(model, ids, loops, context)
        loss = total / count
        results[str(loops)] = {"loss": round(loss, 6), "ppl": round(math.exp(loss), 4), "tokens": count,
                               "kv_bytes_per_token": kv_bytes_per_token(model.config, loops, dtype),
                               "seconds": round(time.perf_counter() - start, 2)}
        done(f"loops={loops}", results[str(loops)])
    return {"loops": results}


def evaluate_adaptive(model: LoopGPT, ids: torch.Tensor, tolerances: list[float], max_loops: int | None = None,
                      min_loops: int = 1, measure: str = DEFAULT_MEASURE, context: int = 0) -> dict:
    """{"auto": {"TOL": {"loss", "ppl", "tokens", "mean_loops", "seconds"}}} for each tolerance."""
    results = {}
    for tol in tolerances:
        start = time.perf_counter()
        total, count, loops = sliding_nll_adaptive(model, ids, tol, max_loops, min_loops, measure, context)
        loss = total / count
        results[f"{tol:g}"] = {"loss": round(loss, 6), "ppl": round(math.exp(loss), 4), "tokens": count,
                               "mean_loops": round(loops / count, 4),
                               "seconds": round(time.perf_counter() - start, 2)}
        done(f"tolerance={tol:g}", results[f"{tol:g}"])
    return {"auto": results}


def fixed_loss_at(curve: dict[int, float], mean_loops: float) -> float:
    """The fixed-depth loss at a fractional loop count, linear between the neighbouring counts of `curve`.

    It is what running a random share of tokens at each of the two neighbouring depths would give on average
    (same mean loops), so adaptive depth has to beat it to be worth anything."""
    xs = sorted(curve)
    return float(np.interp(mean_loops, xs, [curve[n] for n in xs]))  # the end values outside the curve

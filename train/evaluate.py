"""Held-out loss and perplexity per loop count: sliding windows over a whole file, deterministic.

Each token is scored once, with as much left context as the window allows (stride = half the
context, as is usual for perplexity with a fixed-length model).

    loopgpt eval --checkpoint checkpoints/demo --data ../shared/data/tinystories/heldout.txt --loops 1,2,4,6
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loopgpt.model import LoopGPT, Tokenizer
from loopgpt.model.tokenizer import EOT
from tqdm import tqdm


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


@torch.no_grad()
def sliding_nll(model: LoopGPT, ids: torch.Tensor, loops: int, context: int = 0, batch_size: int = 8) -> tuple:
    """(sum of NLL, number of scored tokens) over `ids`: every token after the first, once."""
    context = min(context or model.config.block_size, model.config.block_size)
    device = model.lm_head.weight.device
    spans = windows(len(ids), context)
    total, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        length = chunk[0][1] - chunk[0][0]
        if any(e - b != length for b, e, _ in chunk):  # the short last window runs alone
            chunk_groups = [[c] for c in chunk]
        else:
            chunk_groups = [chunk]
        for group in chunk_groups:
            x = torch.stack([ids[b : e - 1] for b, e, _ in group]).to(device)  # (B, T)
            y = torch.stack([ids[b + 1 : e] for b, e, _ in group]).clone()
            for row, (b, _, first) in enumerate(group):
                y[row, : first - 1 - b] = -1  # scored by an earlier window
            logits, _ = model(x, loops)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().to(device), ignore_index=-1,
                                  reduction="sum")
            total += nll.item()
            count += int((y >= 0).sum())
    return total, count


def evaluate_loops(model: LoopGPT, ids: torch.Tensor, loops_list: list[int], context: int = 0) -> dict:
    """{"loops": {"N": {"loss", "ppl", "tokens"}}} for each loop count."""
    results = {}
    for loops in tqdm(loops_list, desc="eval", unit="loops", leave=False):
        total, count = sliding_nll(model, ids, loops, context)
        loss = total / count
        results[str(loops)] = {"loss": round(loss, 6), "ppl": round(math.exp(loss), 4), "tokens": count}
    return {"loops": results}

"""What the other form of self-speculation would buy at batch 1: a cost model from timed model steps.

The engine speculates as a pipeline (a draft starts looping while its predecessor finishes, so a step holds entries
at different loops). The other form drafts m tokens at k loops one after another, then verifies all of them at
loops k..N-1 in one chunked forward. This times the pieces on the loaded checkpoint (one thread, eager, no engine
or HTTP around them: a lower bound on real per-token cost) and prices every (k, m):

    round cost = (m+1)·k·step(1) + m·head(1) + (N-k)·loop(m+1) + head(m+1)
    tokens per round = (1 - a^(m+1)) / (1 - a)     (a = the acceptance rate of drafts at depth k)
    ratio = (N·step(1) + head(1)) / (round cost / tokens per round)

`step(1)` is one token's decode step through the engine's fast path, `loop(T)` one loop of a T-token chunk
(the prefill path), `head(B)` ln_f + head + greedy pick for B rows. The acceptance rates default to those bench
row 9 measured in the engine (`--accept`).

    python -m loopgpt.loadtest.spec_cost --checkpoint checkpoints/demo
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from loopgpt.model import KVCache, load_checkpoint
from loopgpt.model.step import StepState, decode_step, head_step, prefill

from .timing import repeat

ROW9_ACCEPT = [0.82, 0.89, 0.92, 0.92, 0.97]  # bench row 9, demo, k = 1..5 (docs/performance.md)


def timed(fn: Callable[[], object], reps: int) -> float:
    """Microseconds per call, after a few warm-up calls."""
    return statistics.fmean(repeat(fn, reps, warmup=max(2, reps // 10))) * 1e6


def measure(checkpoint: str, max_entries: int = 6, reps: int = 200) -> dict:
    """Timed pieces on one cache row after a 32-token prompt: {step: {1: us}, loop: {T: us}, head: {B: us}}."""
    model, tokenizer, _ = load_checkpoint(checkpoint)
    cfg = model.config
    n = cfg.max_loops
    prompt = (tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play") * 4)[:32]
    p = len(prompt)
    cache = KVCache(cfg, 2, loops=n)  # row 0 decodes, row 1 is the padding scratch row
    state = StepState.allocate(max_entries, 2, cfg.n_embd, "cpu", torch.float32)
    ctx = min(cfg.block_size, p + 32)
    with torch.inference_mode():
        prefill(model, cache, state, [0], [prompt], [0], [n], 1)
        one = torch.zeros(1, dtype=torch.long)
        step = timed(lambda: decode_step(model, cache, state, one, one, one + p, 1, ctx), reps)
        loop = {t: timed(lambda t=t: prefill(model, cache, state, [0], [prompt[:t]], [p], [n], 1), reps // 4) / n
                for t in range(1, max_entries + 1)}  # one loop of a T-token chunk at positions p..p+T-1

        def head(b: int) -> float:
            lanes, zeros, ones = torch.arange(b), torch.zeros(b, dtype=torch.long), torch.ones(b)
            return timed(lambda: head_step(model, state, lanes, lanes, zeros, ones, zeros, ones, zeros, zeros,
                                           random=False, filtered=False), reps)

        heads = {b: head(b) for b in range(1, max_entries + 1)}
    return {"loops": n, "step": step, "loop": loop, "head": heads}


def price(m: dict, accept: list[float], max_drafts: int = 5) -> list[dict]:
    """Every (k, m) of draft-then-verify against plain lockstep decoding, by the cost model above."""
    n, step, loop, head = m["loops"], m["step"], m["loop"], m["head"]
    plain = n * step + head[1]
    out = []
    for k in range(1, n):
        a = accept[min(k, len(accept)) - 1]
        for d in range(1, min(max_drafts, len(loop) - 1) + 1):
            cost = (d + 1) * k * step + d * head[1] + (n - k) * loop[d + 1] + head[d + 1]
            tokens = (1 - a ** (d + 1)) / (1 - a) if a < 1 else d + 1.0
            out.append({"k": k, "m": d, "accept": a, "tokens_per_round": tokens, "us_per_token": cost / tokens,
                        "ratio": plain / (cost / tokens)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="checkpoints/demo")
    ap.add_argument("--accept", default=",".join(map(str, ROW9_ACCEPT)),
                    help="acceptance rate of drafts at k = 1, 2, ... loops (the last repeats)")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    m = measure(args.checkpoint, reps=args.reps)
    fmt = lambda d: ", ".join(f"{k}: {v:.0f}" for k, v in d.items())  # noqa: E731
    print(f"us: decode step, 1 token {m['step']:.0f}; chunk loop by T {{{fmt(m['loop'])}}}; "
          f"head by rows {{{fmt(m['head'])}}}")
    plain = m["loops"] * m["step"] + m["head"][1]
    print(f"plain lockstep, loops {m['loops']}: {plain:.0f} us/token")
    rows = price(m, [float(a) for a in args.accept.split(",")])
    for r in rows:
        print(f"k={r['k']} m={r['m']} accept {r['accept']:.2f}: {r['tokens_per_round']:.2f} tokens/round, "
              f"{r['us_per_token']:.0f} us/token, {r['ratio']:.2f}x plain")
    best = max(rows, key=lambda r: r["ratio"])
    print(f"best: k={best['k']} m={best['m']}, {best['ratio']:.2f}x plain (no host work counted)")


if __name__ == "__main__":
    main()

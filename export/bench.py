"""Decode speed at batch 1: onnxruntime (split graphs) against PyTorch eager, measured in one run.

`decode_tokens_per_s` takes anything with LoopGPT's call signature (the model or an OnnxRunner), so
`loopgpt bench` can add an ONNX row with `compare_decode(checkpoint, export_dir, loops)`.

    python -m loopgpt.export.bench --checkpoint checkpoints/demo --export exports/demo --loops 1,3,6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from loopgpt.model import SamplingParams, generate_tokens, load_checkpoint

from .runtime import load_onnx


@torch.inference_mode()
def decode_tokens_per_s(model, loops: int, prompt_len: int = 16, tokens: int = 64, repeats: int = 3) -> float:
    """Median over `repeats` of greedy tokens/s of the reference decode loop (`generate_tokens`, prefill
    included) after one untimed warm-up run."""
    cfg = model.config
    if prompt_len + tokens > cfg.block_size:
        raise ValueError(f"prompt_len + tokens ({prompt_len + tokens}) exceeds the context of {cfg.block_size}")
    prompt = [t % cfg.vocab_size for t in range(prompt_len)]
    rates = []
    for r in range(repeats + 1):  # the first run warms up allocators and thread pools, and is dropped
        start = time.perf_counter()
        got = sum(1 for _ in generate_tokens(model, prompt, loops, tokens, SamplingParams(temperature=0.0)))
        assert got == tokens
        if r:
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def compare_decode(checkpoint: str, export_dir: str, loops: list[int], threads: int | None = None,
                   tokens: int = 64) -> list[dict]:
    """One row per loop count: torch and onnxruntime decode tokens/s at batch 1, and their ratio."""
    model, _, _ = load_checkpoint(checkpoint)
    runner, _, _ = load_onnx(export_dir, threads=threads)
    rows = []
    for n in loops:
        eager = decode_tokens_per_s(model, n, tokens=tokens)
        ort = decode_tokens_per_s(runner, n, tokens=tokens)
        rows.append({"loops": n, "torch_tok_s": eager, "onnx_tok_s": ort, "ratio": ort / eager})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--export", required=True, help="a `loopgpt export onnx` directory of that checkpoint")
    p.add_argument("--loops", default="1,2,4", help="comma-separated loop counts")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, batch 1, {args.tokens} decode tokens, median of 3")
    print(f"{'loops':>5} {'torch tok/s':>12} {'onnx tok/s':>11} {'onnx/torch':>10}")
    for row in compare_decode(args.checkpoint, args.export, [int(x) for x in args.loops.split(",")],
                              args.threads, args.tokens):
        print(f"{row['loops']:>5} {row['torch_tok_s']:>12.1f} {row['onnx_tok_s']:>11.1f} {row['ratio']:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`loopgpt bench`: our decode speed against the alternatives, as ratios measured in one process run.

Rows (numbers as in the issue): 1 cached decode vs Hugging Face GPT-2 `generate` on the unrolled
model vs no-cache decoding; 2 depth-wise mixed-loops batch vs the batch padded to max loops;
3-4 through the real HTTP server (bench_http.py); 5 onnxruntime vs torch eager; 6 CUDA (skipped
without a GPU). Same prompt everywhere, one warm-up run excluded, `--reps` repetitions each.

    loopgpt bench --checkpoint checkpoints/demo --reps 5 --json bench.json
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from loopgpt.model import KVCache, LoopGPT, load_checkpoint

from .runner import BUILTIN_PROMPTS
from .timing import Row, interleaved, med, table

MIXED_LOOPS = (1, 2, 4, 6)


@torch.inference_mode()
def cached_decode(model: LoopGPT, prompt: list[int], loops: int | torch.Tensor, n: int, batch: int = 1) -> None:
    """Prefill, then n-1 greedy single-token steps with our KV cache (n tokens in all)."""
    cache = KVCache(model.config, batch, max_len=len(prompt) + n, loops=_deepest(loops))
    logits, _ = model(torch.tensor([prompt] * batch), loops, kv_cache=cache)
    for _ in range(n - 1):
        logits, _ = model(logits[:, -1:].argmax(-1), loops, kv_cache=cache)


@torch.inference_mode()
def naive_decode(model: LoopGPT, prompt: list[int], loops: int, n: int) -> None:
    """n greedy tokens, each by recomputing the whole sequence (no KV cache)."""
    seq = torch.tensor([prompt])
    for _ in range(n):
        logits, _ = model(seq, loops)
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)


def _deepest(loops: int | torch.Tensor) -> int:
    return int(loops) if isinstance(loops, int) else int(loops.max())


def bench_prompt(model: LoopGPT, tokenizer, n: int) -> list[int]:
    """The benchmark prompt: the built-in prompts joined, cut so that prompt + n tokens fit the context."""
    ids = tokenizer.encode(" ".join(BUILTIN_PROMPTS))
    room = model.config.block_size - n
    if room < 4:
        raise ValueError(f"--tokens {n} leaves no room for a prompt in a context of {model.config.block_size}")
    return ids[: min(32, room)]


def row_hf(model: LoopGPT, prompt: list[int], n: int, reps: int) -> Row:
    """Row 1: batch 1 at the trained maximum loops; tokens/s including the prefill, for all three."""
    from .hf import to_hf

    loops = model.config.max_loops
    row = Row(1, f"decode batch 1, loops {loops}: cached vs HF generate", "tok/s",
              "LoopGPT + KVCache, greedy", f"transformers GPT2LMHeadModel.generate (KV cache), "
              f"{model.config.n_layer * model.config.inner_loops * loops} unrolled layers", target=2.0)
    hf = to_hf(model, loops)
    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def hf_generate() -> None:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=model.config.eot_token)
        assert out.shape[1] == len(prompt) + n

    times = interleaved([lambda: cached_decode(model, prompt, loops, n), hf_generate,
                         lambda: naive_decode(model, prompt, loops, n)], reps)
    row.ours, row.base, naive = ([n / t for t in ts] for ts in times)
    row.extra["no KV cache (full recompute per token), tok/s"] = f"{med(naive):.3g} [{min(naive):.3g}-{max(naive):.3g}]"
    row.extra["cached vs no cache"] = f"{med(row.ours) / med(naive):.2f}x"
    return row


def row_depthwise(model: LoopGPT, prompt: list[int], reps: int, batch: int = 16, steps: int = 16) -> Row:
    """Row 2: one decode step of a batch whose rows ask for loops 1, 2, 4, 6 (depth-wise) vs all at 6."""
    cap = model.config.loop_cap
    mix = [min(n, cap) for n in MIXED_LOOPS]
    row_loops = torch.tensor([mix[b % len(mix)] for b in range(batch)])
    deepest = int(row_loops.max())
    theory = deepest / float(row_loops.float().mean())
    row = Row(2, f"mixed loops {mix} at batch {batch}: depth-wise vs padded", "ms/step",
              "per-row loops tensor (loop n runs only rows with loops > n)", f"whole batch at loops={deepest}",
              target=1.6, higher_is_better=False, extra={"theory (max / mean loops)": f"{theory:.2f}x"})
    cache = KVCache(model.config, batch, max_len=len(prompt) + steps + 1, loops=deepest)
    with torch.inference_mode():
        model(torch.tensor([prompt] * batch), deepest, kv_cache=cache)
    token = torch.full((batch, 1), prompt[-1])

    @torch.inference_mode()
    def decode(loops) -> None:
        cache.lengths.fill_(len(prompt))  # rewind: every repetition decodes the same positions
        for _ in range(steps):
            model(token, loops, kv_cache=cache)

    times = interleaved([lambda: decode(row_loops), lambda: decode(deepest)], reps)
    row.ours, row.base = ([1000 * t / steps for t in ts] for ts in times)
    return row


def row_onnx(model: LoopGPT, checkpoint: str, onnx_dir: str | None, prompt: list[int], n: int, reps: int) -> Row:
    """Row 5: onnxruntime runner vs torch eager, batch 1, cached decode at the trained maximum loops."""
    from .bench_onnx import onnx_row

    return onnx_row(model, checkpoint, onnx_dir, prompt, n, reps, cached_decode)


def row_cuda() -> Row:
    row = Row(6, "CUDA decode, batch 1 and 64, roofline fraction", "tok/s", "-", "-")
    if not torch.cuda.is_available():
        row.skipped = "no CUDA device (torch.cuda.is_available() is False)"
    else:  # written and tested on CPU-only machines so far: no GPU was available to validate a CUDA row
        row.skipped = "the CUDA row is not implemented yet"
    return row


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:  # not Linux
        return platform.processor() or platform.machine()


def machine() -> dict:
    return {"platform": platform.platform(), "processor": cpu_name() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0]}


def run_bench(checkpoint: str, rows: set[int], reps: int, tokens: int, json_path: str | None,
              onnx_dir: str | None = None, threads: int = 1) -> int:
    unknown = rows - {1, 2, 3, 4, 5, 6}
    if unknown:
        raise ValueError(f"--rows takes numbers 1..6, got {sorted(unknown)}")
    if reps < 1 or tokens < 2:
        raise ValueError("--reps must be >= 1 and --tokens >= 2")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    # Every contender gets the same thread count. On a shared machine several intra-op threads
    # fighting other processes for cores makes torch's CPU attention up to 15x slower (measured).
    torch.set_num_threads(threads)
    model, tokenizer, _ = load_checkpoint(checkpoint)
    prompt = bench_prompt(model, tokenizer, tokens)
    info = machine()
    print(f"checkpoint {checkpoint}: {model.num_params():,} parameters, {model.config.n_layer} layers x "
          f"{model.config.inner_loops} inner, trained loops {model.config.max_loops}; prompt {len(prompt)} tokens, "
          f"{tokens} decoded, {reps} reps; {info['processor']}, torch {info['torch']}, {info['threads']} threads",
          flush=True)
    results: list[Row] = []
    steps = [(1, lambda: row_hf(model, prompt, tokens, reps)), (2, lambda: row_depthwise(model, prompt, reps)),
             (3, lambda: _http_rows(checkpoint, model, prompt, tokenizer, tokens, reps, rows)),
             (5, lambda: row_onnx(model, checkpoint, onnx_dir, prompt, tokens, reps)), (6, row_cuda)]
    for number, fn in steps:
        if number in rows or (number == 3 and 4 in rows):
            out = fn()
            results.extend(out if isinstance(out, list) else [out])
            print(table(results[-1:] if not isinstance(out, list) else out), flush=True)
    print("\n" + table(results))
    if json_path:
        info["load_average_1m_after"] = os.getloadavg()[0]
        data = {"machine": info, "checkpoint": checkpoint, "prompt_tokens": len(prompt), "tokens": tokens,
                "reps": reps, "rows": [r.to_dict() for r in results]}
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


def _http_rows(checkpoint, model, prompt, tokenizer, tokens, reps, rows) -> list[Row]:
    from .bench_http import http_rows

    return http_rows(checkpoint, model, tokenizer.decode(prompt), prompt, tokens, reps, rows)

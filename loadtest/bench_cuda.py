"""Benchmark row 6: the CUDA engine on a paper-sized model (random-weight `gpt2-81m-loop`, bf16).

Contenders, all in one process on one GPU, same prompt, greedy: the engine eager and with `--cuda-graphs`
at batch 1 and 64, Hugging Face `generate` (bf16, KV cache) on the equivalent unrolled 36-layer GPT-2, a
mixed-depth closed loop at 64 rows ({1,2,4,6} vs all at 6), the fraction of the memory roofline at batch 64
(bytes of weights and K/V one step must read, over the step time, over a copy bandwidth measured here), and
peak memory per batch size. Weights are random: speed does not depend on them, and with no EOS every
request decodes exactly the tokens asked for.

    loopgpt bench --rows 6 --reps 3 --tokens 64
"""

from __future__ import annotations

import time
from typing import Any

import torch
from loopgpt.model import LoopGPT, load_tokenizer, preset

from loopgpt import install_hint

from .depths import MIXED_LOOPS, depth_gain
from .timing import Row, med

MIXED = list(MIXED_LOOPS)
PRESET = "gpt2-81m-loop"


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (time.perf_counter() - t0)


def step_bytes(model: LoopGPT, rows: int, ctx: float, head_fraction: float, dtype_bytes: int) -> float:
    """Bytes one continuous-depth step must read: the block stack's weights once, the head's weights on the steps
    that sample, and each row's K/V for its own loop (every layer x inner loop, `ctx` positions, K and V)."""
    cfg = model.config
    block = sum(p.numel() for p in model.transformer.h.parameters())
    head = model.lm_head.weight.numel() + 2 * cfg.n_embd
    kv = rows * cfg.n_layer * cfg.inner_loops * 2 * cfg.n_embd * ctx
    return (block + head_fraction * head + kv) * dtype_bytes


def row_cuda(engine: Any, reps: int, tokens: int, dtype: torch.dtype) -> Row:
    row = Row(6, f"CUDA {PRESET} (random, {str(dtype).removeprefix('torch.')}) batch 1: graphs vs HF", "tok/s",
              "engine with --cuda-graphs", "transformers generate (KV cache), 36 unrolled layers", target=3.0)
    if not torch.cuda.is_available():
        row.skipped = "no CUDA device (torch.cuda.is_available() is False)"
        return row
    if engine is None:
        row.skipped = f"the engine needs the server extra: {install_hint('server')}"
        return row
    from .hf import to_hf

    torch.manual_seed(0)
    model = LoopGPT(preset(PRESET)).to("cuda", dtype).eval()
    tokenizer = load_tokenizer("gpt2")
    prompt = tokenizer.encode("Once upon a time, in a land far away, there lived a little girl who loved to read "
                              "books about the stars and the sea.")[:32]
    loops = model.config.max_loops
    hf = to_hf(model, loops)
    # K/V for the trained loops only: at loop_cap (24) a 64-row cache of this model would take 29 GB per engine
    engines = {g: engine(model, tokenizer, 64, device="cuda", dtype=dtype, cuda_graphs=g, max_loops=loops)
               for g in (False, True)}
    try:
        def ours(graphs: bool, batch: int) -> float:
            _, seconds = engines[graphs].generate([(prompt, loops, tokens)] * batch)
            return batch * tokens / seconds

        @torch.inference_mode()
        def theirs(batch: int) -> float:
            ids = torch.tensor([prompt] * batch, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                        do_sample=False, use_cache=True, pad_token_id=0)
            torch.cuda.synchronize()
            return batch * tokens / (time.perf_counter() - t0)

        rates: dict[str, list[float]] = {}
        for batch in (1, 64):
            fns = {f"graphs b{batch}": lambda b=batch: ours(True, b), f"eager b{batch}": lambda b=batch: ours(False, b),
                   f"hf b{batch}": lambda b=batch: theirs(b)}
            for _ in range(reps + 1):  # taking turns; the first round warms up and is dropped
                for key, fn in fns.items():
                    rates.setdefault(key, []).append(fn())
            for key in fns:
                rates[key] = rates[key][1:]
        row.ours, row.base = rates["graphs b1"], rates["hf b1"]
        for k, v in rates.items():
            row.extra[f"{k} tok/s"] = f"{med(v):.4g} [{min(v):.4g}-{max(v):.4g}]"
        row.extra["batch 1: graphs vs eager"] = f"{med(rates['graphs b1']) / med(rates['eager b1']):.2f}x"
        row.extra["batch 64: graphs vs HF"] = f"{med(rates['graphs b64']) / med(rates['hf b64']):.2f}x"
        _mixed_and_roofline(row, engines[True], model, prompt, tokens, reps, dtype)
        row.extra["peak memory (max_memory_allocated), max-batch 64, both engines + HF"] = (
            f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    finally:
        for e in engines.values():
            e.close()
    return row


def _mixed_and_roofline(row: Row, eng: Any, model: LoopGPT, prompt: list[int], tokens: int, reps: int,
                        dtype: torch.dtype) -> None:
    """Mixed-depth closed loop at 64 rows vs all at the deepest; roofline fraction of an all-deep batch-64 step."""
    deep = max(MIXED)
    mixed, padded = [], []
    for _ in range(reps):
        mixed.append(eng.closed_loop(prompt, MIXED, 64, tokens, 256))
        padded.append(eng.closed_loop(prompt, [deep], 64, tokens, 256))
    theory = depth_gain(MIXED)
    gain = med(mixed) / med(padded)
    row.extra[f"closed loop, 64 rows: mixed {MIXED} vs all at {deep}, tok/s"] = (
        f"{med(mixed):.4g} vs {med(padded):.4g}: {gain:.2f}x (theory {theory:.2f}x, {gain / theory:.0%} of it)")
    steps0 = eng.engine.steps
    t0 = time.perf_counter()
    eng.generate([(prompt, deep, tokens)] * 64)
    wall = time.perf_counter() - t0
    steps = eng.engine.steps - steps0
    ctx = len(prompt) + tokens / 2  # mean keys read per row over the run
    moved = step_bytes(model, 64, ctx, 1 / deep, torch.finfo(dtype).bits // 8)
    bw = copy_bandwidth()
    per_step = wall / steps
    row.extra["batch 64 all at 6: step time, bytes per step, copy bandwidth"] = (
        f"{per_step * 1e6:.0f} us, {moved / 1e6:.1f} MB, {bw / 1e12:.2f} TB/s")
    row.extra["roofline fraction at batch 64 (bytes / step time / copy bandwidth)"] = f"{moved / per_step / bw:.0%}"

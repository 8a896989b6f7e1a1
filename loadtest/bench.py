"""`loopgpt bench`: our decode speed against the alternatives, as ratios measured in one process run.

Rows (numbers as in the issues): 1 the engine's batch-1 decode vs Hugging Face GPT-2 `generate` on the
unrolled model (and the reference decode loop, and no-cache decoding); 2 a mixed-depth closed loop
({1,2,4,6}) vs every row at the deepest, at 8, 16 and 32 rows; 3-4 through the real HTTP server
(bench_http.py); 5 onnxruntime vs torch; 6 CUDA (bench_cuda.py, skipped without a GPU); 7 several prompts
prefilled in one forward vs one per turn (TTFT); 8 peak memory per --max-batch; 9 self-speculative decoding
vs plain (batch 1 per draft depth, then growing batches); 10 prompts behind a cached prefix, with the prefix cache
vs without (TTFT). Same prompt everywhere,
one warm-up run excluded, `--reps` repetitions each. "The engine" is `loopgpt serve`'s engine driven
in-process (`loopgpt.server.inprocess`, handed in by the CLI: loadtest/ imports only model/).

    loopgpt bench --checkpoint checkpoints/demo --reps 5 --json bench.json
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
from loopgpt.model import LoopGPT, SamplingParams, generate_tokens, load_checkpoint, resolve_dtype

from loopgpt import install_hint

from .depths import depth_gain, mixed_loops
from .runner import BUILTIN_PROMPTS
from .timing import Row, interleaved, med, table

GREEDY = SamplingParams(temperature=0.0)
NO_ENGINE = f"the engine rows need the server extra: {install_hint('server')}"


def reference_decode(model: Any, prompt: list[int], loops: int, n: int) -> None:
    """The reference decode loop (`generate_tokens`: prefill, then one full-depth cached forward per token)."""
    with torch.inference_mode():
        got = sum(1 for _ in generate_tokens(model, prompt, loops, n, GREEDY))
    assert got == n


@torch.inference_mode()
def naive_decode(model: LoopGPT, prompt: list[int], loops: int, n: int) -> None:
    """n greedy tokens, each by recomputing the whole sequence (no KV cache)."""
    seq = torch.tensor([prompt])
    for _ in range(n):
        logits, _ = model(seq, loops)
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)


def bench_prompt(model: LoopGPT, tokenizer, n: int) -> list[int]:
    """The benchmark prompt: the built-in prompts joined, cut so that prompt + n tokens fit the context."""
    ids = tokenizer.encode(" ".join(BUILTIN_PROMPTS))
    room = model.config.block_size - n
    if room < 4:
        raise ValueError(f"--tokens {n} leaves no room for a prompt in a context of {model.config.block_size}")
    return ids[: min(32, room)]


def row_hf(model: LoopGPT, tokenizer, engine: Any, prompt: list[int], n: int, reps: int, compile: bool = False) -> Row:
    """Row 1: batch 1 at the trained maximum loops; tokens/s including the prefill, for every contender (with
    `compile`, also the engine with --compile, its compile time excluded)."""
    from .hf import to_hf

    loops = model.config.max_loops
    row = Row(1, f"decode batch 1, loops {loops}: engine vs HF generate", "tok/s",
              "loopgpt engine (continuous depth, in-process), greedy", f"transformers GPT2LMHeadModel.generate "
              f"(KV cache), {model.config.n_layer * model.config.inner_loops * loops} unrolled layers", target=2.5)
    if engine is None:
        row.skipped = NO_ENGINE
        return row
    hf = to_hf(model, loops)
    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def hf_generate() -> None:
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=model.config.eot_token)
        assert out.shape[1] == len(prompt) + n

    engines = [engine(model, tokenizer, 1)] + ([engine(model, tokenizer, 1, compile=True)] if compile else [])
    try:
        fns = [lambda: engines[0].generate([(prompt, loops, n)]), hf_generate,
               lambda: reference_decode(model, prompt, loops, n), lambda: naive_decode(model, prompt, loops, n)]
        times = interleaved(fns + [lambda: engines[-1].generate([(prompt, loops, n)])] * compile, reps)
    finally:
        for e in engines:
            e.close()
    row.ours, row.base, ref, naive = ([n / t for t in ts] for ts in times[:4])
    if compile:
        rates = [n / t for t in times[4]]
        row.extra["engine with --compile, tok/s"] = (f"{med(rates):.3g} [{min(rates):.3g}-{max(rates):.3g}]: "
                                                     f"{med(rates) / med(row.base):.2f}x HF")
    row.extra["reference decode loop (generate_tokens), tok/s"] = f"{med(ref):.3g} [{min(ref):.3g}-{max(ref):.3g}]"
    row.extra["no KV cache (full recompute per token), tok/s"] = f"{med(naive):.3g} [{min(naive):.3g}-{max(naive):.3g}]"
    row.extra["engine vs reference loop"] = f"{med(row.ours) / med(ref):.2f}x"
    return row


def row_mixed(model: LoopGPT, tokenizer, engine: Any, prompt: list[int], reps: int, n: int) -> Row:
    """Row 2: closed loops that keep R rows busy, each new request taking the next loops of {1,2,4,6}, against
    the same with every request at the deepest. With equal tokens per request the work per token is its
    loops, so the theoretical gain is max / mean loops (1.85x); continuous depth reaches it when a step costs
    the same whatever loops its rows stand at."""
    mix = mixed_loops(model.config.loop_cap)
    deep, theory = max(mix), depth_gain(mix)
    row = Row(2, f"closed loop, loops {mix} vs all {deep}, 32 rows", "tok/s", f"mixed loops {mix}",
              f"every request at loops {deep}", target=round(0.9 * theory, 2),
              extra={"theory (max / mean loops)": f"{theory:.2f}x"})
    if engine is None:
        row.skipped = NO_ENGINE
        return row
    for rows in (8, 16, 32):
        eng = engine(model, tokenizer, rows)
        try:
            eng.closed_loop(prompt, mix, rows, n, rows)  # warm-up
            mixed, padded, phases = [], [], {}
            for _ in range(reps):
                for name, cycle, out in (("mixed", mix, mixed), ("padded", [deep], padded)):
                    before = {**eng.engine.seconds, **eng.runner.seconds}
                    out.append(eng.closed_loop(prompt, cycle, rows, n, 4 * rows))
                    for k, v in {**eng.engine.seconds, **eng.runner.seconds}.items():
                        phases.setdefault(name, {}).setdefault(k, 0.0)
                        phases[name][k] += v - before[k]
        finally:
            eng.close()
        gain = med(mixed) / med(padded)
        row.extra[f"{rows} rows, tok/s"] = (f"{med(mixed):.4g} vs {med(padded):.4g}: {gain:.2f}x "
                                            f"({gain / theory:.0%} of theory)")
        row.extra[f"{rows} rows, engine thread s: " + "/".join(phases["mixed"])] = "; ".join(
            f"{name} " + "/".join(f"{v:.2f}" for v in p.values()) for name, p in phases.items())
    row.ours, row.base = mixed, padded
    return row


def row_onnx(model: LoopGPT, checkpoint: str, onnx_dir: str | None, prompt: list[int], n: int, reps: int) -> Row:
    """Row 5: onnxruntime runner vs torch eager, batch 1, the reference decode loop at the trained maximum loops."""
    from .bench_onnx import onnx_row

    return onnx_row(model, checkpoint, onnx_dir, prompt, n, reps, reference_decode)


def row_prefill(model: LoopGPT, tokenizer, engine: Any, reps: int, prompts: int = 8, length: int = 128) -> Row:
    """Row 7: `prompts` prompts of `length` tokens arrive together: prefilled in one padded forward (the prefill
    budget covers all) vs one prompt per turn (budget = one prompt). Time until every request has its first token."""
    length = min(length, model.config.block_size - 2)
    row = Row(7, f"{prompts} prompts of {length} tokens: batched prefill vs one by one", "s to all first tokens",
              f"one forward (--prefill-chunk {prompts * length})", f"one prompt per turn (--prefill-chunk {length})",
              target=1.0, higher_is_better=False)
    if engine is None:
        row.skipped = NO_ENGINE
        return row
    ids = tokenizer.encode(" ".join(BUILTIN_PROMPTS * 40))
    specs = [(ids[i * 7:i * 7 + length], model.config.max_loops, 1) for i in range(prompts)]
    engines = [engine(model, tokenizer, prompts, prefill_chunk=c) for c in (prompts * length, length)]
    try:
        row.ours, row.base = interleaved([lambda e=e: e.generate(specs) for e in engines], reps)
    finally:
        for e in engines:
            e.close()
    return row


def row_prefix(model: LoopGPT, tokenizer, engine: Any, reps: int, prompts: int = 8, suffix: int = 25) -> Row:
    """Row 10: `prompts` requests that share a long prefix (three quarters of the context: 192 tokens of the demo's
    256, 384 of 512), each with its own `suffix`-token end, arrive together; the prefix is already cached (an
    earlier request's). Time until every one has its first token, with the prefix cache and without (the load
    test's --shared-prefix runs the same case through HTTP at 8 streams)."""
    length = model.config.block_size * 3 // 4
    suffix = min(suffix, model.config.block_size - length - 1)  # + the first token: within the context
    row = Row(10, f"{prompts} prompts, a cached {length}-token prefix + {suffix} own tokens: prefix cache vs none",
              "s to all first tokens", "prefix cache (64 MiB)", "--no-prefix-cache", target=4.0,
              higher_is_better=False)
    if engine is None:
        row.skipped = NO_ENGINE
        return row
    ids = tokenizer.encode(" ".join(BUILTIN_PROMPTS * 40))
    prefix, ends = ids[:length], ids[length:]
    turn = [0]

    def specs() -> list[tuple[list[int], int, int]]:  # new suffixes every call: only the prefix is ever cached
        turn[0] += 1
        return [(prefix + ends[(turn[0] * prompts + i) * 3 % (len(ends) - suffix):][:suffix], model.config.max_loops,
                 1) for i in range(prompts)]

    engines = [engine(model, tokenizer, prompts, prefix_cache_bytes=b) for b in (64 << 20, 0)]
    try:
        for e in engines:
            e.generate([(prefix + ends[:suffix], model.config.max_loops, 1)])  # the prefix, cached
        row.ours, row.base = interleaved([lambda e=e: e.generate(specs()) for e in engines], reps)
        waiters = [engines[0].submit(*spec) for spec in specs()]
        for w in waiters:
            w.done.wait(600)
        row.extra = {"cached tokens per request (ours)": sorted({w.finish.cached_tokens for w in waiters})}
    finally:
        for e in engines:
            e.close()
    return row


def row_memory(model: LoopGPT, tokenizer, engine: Any, prompt: list[int], n: int) -> Row:
    """Row 8: peak resident memory of this process after serving a full batch, per --max-batch, smallest first (CPU;
    on CUDA row 6 reports max_memory_allocated)."""
    row = Row(8, "peak memory per --max-batch (RSS of this process)", "MiB", "-", "-")
    if engine is None:
        row.skipped = NO_ENGINE
        return row
    for rows in (1, 8, 32):
        eng = engine(model, tokenizer, rows)
        try:
            eng.generate([(prompt, model.config.max_loops, n)] * rows)
            cache = eng.runner.cache
            kv = 2 * cache.k.numel() * cache.k.element_size()
        finally:
            eng.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row.extra[f"--max-batch {rows}"] = f"peak RSS so far {peak:.0f} MiB, of which KV cache {kv / 2**20:.1f} MiB"
    return row


def row_speculative(model: LoopGPT, tokenizer, engine: Any, prompt: list[int], reps: int, n: int) -> Row:
    """Row 9: self-speculative decoding (drafts from the request's own first k loops) vs plain, same engine, greedy:
    batch 1 per k (acceptance rate, tokens/s, identical output), then `auto` and the best fixed k at growing
    batch sizes, to find where drafting stops paying (auto pauses drafting beyond `spec_batch_limit` tokens)."""
    from loopgpt.server.engine.speculation import SpecRequest

    loops = model.config.max_loops
    row = Row(9, f"decode batch 1, loops {loops}: self-speculative (auto) vs plain", "tok/s", "speculative auto",
              "plain continuous depth", target=1.5)
    if engine is None or loops < 2:
        row.skipped = NO_ENGINE if engine is None else "a checkpoint trained for one loop cannot draft from fewer"
        return row
    eng = engine(model, tokenizer, 32, lanes_per_row=4)
    try:
        def rate(batch: int, spec: Any) -> float:
            tokens, seconds = eng.generate([(prompt, loops, n)] * batch, speculative=spec)
            outputs.setdefault(batch, []).append(tokens[0])
            return batch * n / seconds

        outputs: dict[int, list] = {}
        auto = SpecRequest(auto=True)
        times = interleaved([lambda: rate(1, auto), lambda: rate(1, None)], reps)
        row.ours, row.base = ([n / t for t in ts] for ts in times)
        best, best_rate = 1, 0.0
        for k in range(1, loops):
            fixed = SpecRequest(draft_loops=k, tokens=3)
            before = list(eng.engine.drafts)
            got = [rate(1, fixed) for _ in range(reps)]
            verified, accepted = (a - b for a, b in zip(eng.engine.drafts, before, strict=True))
            share = accepted / max(verified, 1)
            row.extra[f"k={k}: tok/s, drafts accepted"] = f"{med(got):.4g}, {accepted}/{verified} ({share:.0%})"
            best, best_rate = (k, med(got)) if med(got) > best_rate else (best, best_rate)
        row.extra["greedy output identical to plain"] = "yes" if all(o == outputs[1][0] for o in outputs[1]) else "NO"
        for batch in (4, 8, 16, 32):
            spec, plain = (med(x) for x in zip(*[(rate(batch, SpecRequest(draft_loops=best, tokens=3)),
                                                  rate(batch, None)) for _ in range(reps)], strict=True))
            row.extra[f"batch {batch}: k={best} vs plain, tok/s"] = f"{spec:.4g} vs {plain:.4g} ({spec / plain:.2f}x)"
        row.extra["auto pauses drafting at (tokens in flight)"] = eng.engine.spec_batch_limit
    finally:
        eng.close()
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


def run_bench(checkpoints: list[str], rows: set[int], reps: int, tokens: int, json_path: str | None,
              onnx_dir: str | None = None, threads: int = 1, dtype: str = "auto", engine: Any = None,
              compile: bool = False) -> int:
    """Every asked row on each checkpoint in turn (row 6 once: it brings its own model). `engine` is
    `loopgpt.server.inprocess.InProcess` (or None: the engine rows are skipped)."""
    unknown = rows - set(range(1, 11))
    if unknown:
        raise ValueError(f"--rows takes numbers 1..10, got {sorted(unknown)}")
    if reps < 1 or tokens < 2:
        raise ValueError("--reps must be >= 1 and --tokens >= 2")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if onnx_dir is not None and len(checkpoints) > 1:
        raise ValueError("--onnx names the export of one checkpoint; give a single --checkpoint with it")
    # Every contender gets the same thread count. On a shared machine several intra-op threads
    # fighting other processes for cores makes torch's CPU attention up to 15x slower (measured).
    torch.set_num_threads(threads)
    cpu_dtype = resolve_dtype(dtype, "cpu")
    info = machine()
    print(f"{info['processor']}, torch {info['torch']}, {info['threads']} threads, {dtype_name(cpu_dtype)} on the "
          f"CPU; {tokens} tokens decoded, {reps} reps", flush=True)
    results: list[Row] = []
    prompts: dict[str, int] = {}
    for checkpoint in checkpoints:
        got, prompts[checkpoint] = _checkpoint_rows(checkpoint, rows - {6}, reps, tokens, onnx_dir, cpu_dtype,
                                                    engine, compile)
        results.extend(got)
    if 6 in rows:
        cuda = _cuda_row(engine, reps, tokens, dtype)
        results.append(cuda)
        print(table([cuda]), flush=True)
    print("\n" + table(results))
    if json_path:
        info["load_average_1m_after"] = os.getloadavg()[0]
        data = {"machine": info, "checkpoints": checkpoints, "prompt_tokens": prompts, "tokens": tokens,
                "reps": reps, "rows": [r.to_dict() for r in results]}
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoint_rows(checkpoint: str, rows: set[int], reps: int, tokens: int, onnx_dir: str | None,
                     cpu_dtype: torch.dtype, engine: Any, compile: bool) -> tuple[list[Row], int]:
    """The CPU rows of one checkpoint, each labelled with it and its dtype; (rows, prompt tokens)."""
    model, tokenizer, _ = load_checkpoint(checkpoint, dtype=cpu_dtype)
    prompt = bench_prompt(model, tokenizer, tokens)
    cfg = model.config
    if engine is not None:  # the engine's cache and buffers at the weights' dtype (equal dtype in every row)
        engine = functools.partial(engine, dtype=cpu_dtype)
    print(f"\ncheckpoint {checkpoint}: {model.num_params():,} parameters, {cfg.n_layer} layers x {cfg.inner_loops} "
          f"inner, trained loops {cfg.max_loops}, vocabulary {cfg.vocab_size:,}; prompt {len(prompt)} tokens",
          flush=True)

    def onnx() -> Row:
        # the ONNX export runs float32, so its torch contender does too, whatever --dtype says
        ref = model if cpu_dtype == torch.float32 else load_checkpoint(checkpoint, dtype=torch.float32)[0]
        row = row_onnx(ref, checkpoint, onnx_dir, prompt, tokens, reps)
        row.dtype = dtype_name(torch.float32)
        return row

    steps = [(1, lambda: row_hf(model, tokenizer, engine, prompt, tokens, reps, compile)),
             (2, lambda: row_mixed(model, tokenizer, engine, prompt, reps, tokens)),
             (3, lambda: _http_rows(checkpoint, model, tokenizer, prompt, tokens, reps, rows, engine)),
             (5, onnx),
             (7, lambda: row_prefill(model, tokenizer, engine, reps)),
             (8, lambda: row_memory(model, tokenizer, engine, prompt, tokens)),
             (9, lambda: row_speculative(model, tokenizer, engine, prompt, reps, tokens)),
             (10, lambda: row_prefix(model, tokenizer, engine, reps))]
    results: list[Row] = []
    for number, fn in steps:
        if number in rows or (number == 3 and 4 in rows):
            out = fn()
            out = out if isinstance(out, list) else [out]
            for row in out:
                row.checkpoint = checkpoint
                row.dtype = row.dtype or dtype_name(cpu_dtype)
            results.extend(out)
            print(table(out), flush=True)
    return results, len(prompt)


def _cuda_row(engine: Any, reps: int, tokens: int, dtype: str) -> Row:
    from .bench_cuda import PRESET, row_cuda

    cuda_dtype = resolve_dtype(dtype, "cuda")
    row = row_cuda(engine, reps, tokens, cuda_dtype)
    row.checkpoint, row.dtype = f"{PRESET} (random)", dtype_name(cuda_dtype)
    return row


def _http_rows(checkpoint, model, tokenizer, prompt, tokens, reps, rows, engine) -> list[Row]:
    from .bench_http import http_rows

    return http_rows(checkpoint, model, tokenizer, prompt, tokens, reps, rows, engine)

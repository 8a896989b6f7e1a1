"""What the prefix cache's copies cost against the prefill they save, at depth 6, one thread, at the dtype the server
picks (`--dtype auto`): prefilling a prefix, copying it into a row (admission), copying it out (after a prefill), and
prefilling a 25-token suffix behind it, alone and four suffixes batched. Decides copy-at-admission over a paged pool
(docs/architecture.md); the suffix rows are a prefix-cache hit's prefill (its TTFT beside the load test's).

    python scripts/prefix_copy_cost.py                          # the demo, a 208-token prefix
    python scripts/prefix_copy_cost.py /tmp/gpt2vocab 384       # `loopgpt bench-checkpoint --out /tmp/gpt2vocab`
"""

from __future__ import annotations

import sys
import time

import torch
from loopgpt.model import load_checkpoint, resolve_dtype
from loopgpt.server.engine import ModelRunner, PrefillChunk

SUFFIX = 25


def best(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # the least disturbed run: the machine may be shared


def main() -> None:
    torch.set_num_threads(1)
    path = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/demo"
    dtype = resolve_dtype("auto", "cpu")
    model, _, _ = load_checkpoint(path, dtype=dtype)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 208
    runner = ModelRunner(model, max_batch=5, dtype=dtype, prefix_cache_bytes=256 << 20)
    cache = runner.prefix
    ids = [(i * 7) % model.config.vocab_size for i in range(n + SUFFIX)]
    with torch.inference_mode():
        prefill = best(lambda: runner._prefill([PrefillChunk(0, ids[:n], 0, 6)]), 3)
        cache.store(0, ids[:n], 6)
        blocks = cache.match(ids, 6)
        load = best(lambda: cache.load(model, 1, blocks, 6))

        def store() -> None:
            cache.blocks.clear()
            cache.used = 0
            cache.store(0, ids[:n], 6)

        out = best(store)
        start = len(blocks) * len(blocks[0].ids)
        one = best(lambda: runner._prefill([PrefillChunk(1, ids[start:], start, 6)]))
        four = best(lambda: runner._prefill([PrefillChunk(r, ids[start:], start, 6) for r in (1, 2, 3, 4)]))
    print(f"{path} ({dtype}), depth 6: prefill {n} tokens {prefill * 1e3:.1f} ms; copy in {start} tokens "
          f"{load * 1e3:.2f} ms, copy out {out * 1e3:.2f} ms; a {len(ids) - start}-token suffix's prefill behind it "
          f"{one * 1e3:.1f} ms alone, {four * 1e3:.1f} ms for four")


if __name__ == "__main__":
    main()

"""What the prefix cache's copies cost against the prefill they save, on the demo checkpoint at depth 6, one thread:
copying a 208-token cached prefix into a row (admission), copying it out (after a prefill), prefilling it, and
prefilling an 8-token suffix behind it. Decides copy-at-admission over a paged pool (docs/architecture.md).

    python scripts/prefix_copy_cost.py [checkpoint]
"""

from __future__ import annotations

import sys
import time

import torch
from loopgpt.model import load_checkpoint
from loopgpt.server.engine import ModelRunner, PrefillChunk


def best(fn, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # the least disturbed run: the machine may be shared


def main() -> None:
    torch.set_num_threads(1)
    model, _, _ = load_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/demo")
    runner = ModelRunner(model, max_batch=2, prefix_cache_bytes=64 << 20)
    cache = runner.prefix
    ids = [(i * 7) % model.config.vocab_size for i in range(208)]
    with torch.inference_mode():
        prefill = best(lambda: runner._prefill([PrefillChunk(0, ids, 0, 6)]))
        cache.store(0, ids, 6)
        blocks = cache.match(ids + [0], 6)
        load = best(lambda: cache.load(1, blocks, 6))

        def store() -> None:
            cache.blocks.clear()
            cache.used = 0
            cache.store(0, ids, 6)

        out = best(store)
        suffix = best(lambda: runner._prefill([PrefillChunk(1, ids[200:], 200, 6)]))
    print(f"depth 6, {len(ids)} tokens: prefill {prefill * 1e3:.1f} ms; copy in {load * 1e3:.2f} ms, copy out "
          f"{out * 1e3:.2f} ms; an 8-token suffix's prefill behind it {suffix * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

"""Where a head row's time goes on this machine, on GPT-2's vocabulary: the head matmul (float32 and bf16), the
greedy argmax, and the per-token NLL + entropy metrics (a log-softmax over the vocabulary), at 1, 8 and 32 rows,
one thread. Decides which per-token metrics are cheap enough to keep (docs/performance.md).

    python scripts/head_cost.py
"""

from __future__ import annotations

import torch
from loopgpt.loadtest.timing import repeat
from loopgpt.model.sampling import token_stats


def best(fn, reps: int = 30) -> float:
    return min(repeat(fn, reps)) * 1e3  # ms, the least disturbed run


def main() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    vocab, d = 50257, 192
    print("| rows | head f32 ms | head bf16 ms | argmax ms | NLL + entropy ms | NLL alone ms | "
          "NLL + entropy / (bf16 head + argmax) |")
    print("|---|---|---|---|---|---|---|")
    for rows in (1, 8, 32):
        w32, x32 = torch.randn(vocab, d), torch.randn(rows, d)
        w16, x16 = w32.bfloat16(), x32.bfloat16()
        logits = (x32 @ w32.T).float()
        tokens = logits.argmax(-1)
        f32 = best(lambda: x32 @ w32.T)  # noqa: B023
        bf16 = best(lambda: (x16 @ w16.T).float())  # noqa: B023
        arg = best(lambda: logits.argmax(-1))  # noqa: B023
        stats = best(lambda: token_stats(logits, tokens))  # noqa: B023
        nll = best(lambda: token_stats(logits, tokens, entropy=False))  # noqa: B023
        print(f"| {rows} | {f32:.2f} | {bf16:.2f} | {arg:.3f} | {stats:.2f} | {nll:.2f} | {stats / (bf16 + arg):.0%} |")


if __name__ == "__main__":
    main()

"""The quality cost of bfloat16 against float32 on the same checkpoint: held-out argmax agreement and the NLL
difference per loop count (docs/performance.md, "bf16 on the CPU"). Logits are float32 in both runs.

    python scripts/bf16_quality.py --checkpoint checkpoints/demo --data ../shared/data/tinystories/heldout.txt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from loopgpt.model import load_checkpoint
from loopgpt.model.forward import forward
from loopgpt.train.evaluate import load_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="checkpoints/demo")
    p.add_argument("--data", default="../shared/data/tinystories/heldout.txt")
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens scored (from the file's start)")
    p.add_argument("--loops", default="1,3,6")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    ref, tokenizer, _ = load_checkpoint(args.checkpoint, dtype=torch.float32)
    low, _, _ = load_checkpoint(args.checkpoint, dtype=torch.bfloat16)
    ctx = ref.config.block_size
    ids = load_tokens(args.data, tokenizer, args.tokens + 1)
    n = (len(ids) - 1) // ctx * ctx
    x, y = ids[:n].view(-1, ctx), ids[1:n + 1].view(-1, ctx)  # (windows, ctx)
    print(f"{args.checkpoint}: {n} held-out tokens in windows of {ctx}")
    print("| loops | argmax agreement | NLL float32 | NLL bf16 | difference |")
    print("|---|---|---|---|---|")
    for loops in (int(v) for v in args.loops.split(",")):
        agree, nll32, nll16 = 0, 0.0, 0.0
        for i in range(0, len(x), 8):
            a = forward(ref, x[i:i + 8], loops).float()
            b = forward(low, x[i:i + 8], loops).float()
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            nll32 += F.cross_entropy(a.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
            nll16 += F.cross_entropy(b.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
        print(f"| {loops} | {agree / n:.2%} | {nll32 / n:.4f} | {nll16 / n:.4f} | {(nll16 - nll32) / n:+.4f} |")


if __name__ == "__main__":
    main()

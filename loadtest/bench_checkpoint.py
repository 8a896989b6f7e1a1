"""The realistic benchmark checkpoint: the demo's shape with GPT-2's 50,257-token vocabulary, random weights.

Every speed row runs on the demo and on this one: the demo's vocabulary (2,048) makes the LM head and the
per-token vocabulary work unrealistically cheap, real models have 32k-200k tokens. Speed does not depend on the
weights, so they are random (seeded) and the checkpoint is built in a second instead of trained. The `gpt2`
encoding loads offline from the tiktoken cache (TIKTOKEN_CACHE_DIR).

    loopgpt bench-checkpoint --out /tmp/gpt2-vocab
    loopgpt bench --checkpoint checkpoints/demo --checkpoint /tmp/gpt2-vocab
"""

from __future__ import annotations

from pathlib import Path

# The demo's depth and width; GPT-2's tokenizer; no gate (a random gate would only add noise); a 512-token context
# so that 64-token prompts and 64 generated tokens fit with room to spare.
OVERRIDES = dict(vocab_size=50257, tokenizer="gpt2", eot_token=50256, gate="none", block_size=512)
BASE = "demo"


def build_bench_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """Write the checkpoint into `out` (created if needed); refuses a directory that already holds a checkpoint,
    so that a typo cannot overwrite a trained one."""
    import torch
    from loopgpt.model import LoopGPT, load_tokenizer, preset, save_checkpoint
    from loopgpt.model.checkpoint import CONFIG

    out = Path(out)
    if (out / CONFIG).exists():
        raise ValueError(f"{out} already holds a checkpoint ({CONFIG}); give --out a new or empty directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give --out a new or empty directory")
    config = preset(BASE, **OVERRIDES)
    tokenizer = load_tokenizer(config.tokenizer)  # before anything is written: offline without a cache, it fails
    torch.manual_seed(seed)
    model = LoopGPT(config).eval()
    return save_checkpoint(model, out, tokenizer)


def add_bench_checkpoint_parser(sub) -> None:
    """Registered whatever extras are installed: it needs only the base install (torch, tiktoken); torch is
    imported when the command runs, not when the parser is built."""
    p = sub.add_parser("bench-checkpoint", help="write the benchmark checkpoint: the demo's shape with GPT-2's "
                       "vocabulary (50,257), random weights")
    p.add_argument("--out", required=True, help="directory to create (must not hold a checkpoint already)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.set_defaults(func=cmd_bench_checkpoint)


def cmd_bench_checkpoint(args) -> int:
    from loopgpt.model import preset

    out = build_bench_checkpoint(args.out, args.seed)
    config = preset(BASE, **OVERRIDES)
    print(f"wrote {out}: preset {BASE!r} with {', '.join(f'{k}={v}' for k, v in OVERRIDES.items())}; "
          f"{config.num_params():,} parameters, random weights (seed {args.seed})")
    return 0

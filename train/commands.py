"""The `prepare`, `train` and `eval` subcommands: argparse flags mapped 1:1 onto the dataclasses.

    loopgpt prepare --help; loopgpt train --help; loopgpt eval --help
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int, "max_loops": int,
               "inner_loops": int, "gate": str, "dropout": float, "kv_budget": int, "loop_cap": int}


def add_parsers(sub) -> None:
    from .trainer import TrainConfig  # first: without the train extra this fails before any parser exists

    p = sub.add_parser("prepare", help="text files -> token shards (+ trained tokenizer)")
    p.add_argument("--input", nargs="+", default=[], help="training text file(s)")
    p.add_argument("--hf-dataset", default=None, help="a Hugging Face dataset name instead of --input (online)")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-field", default="text", help="the dataset's text field")
    p.add_argument("--hf-limit", type=int, default=0, help="read at most N documents (0: all)")
    p.add_argument("--val-input", nargs="+", default=None, help="validation text file(s); default: a split")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (any tiktoken name) or train:VOCAB")
    p.add_argument("--split", default="eot", choices=["eot", "blank", "none"],
                   help="document boundaries: <|endoftext|> markers, blank lines, or none")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a checkpoint (works under torchrun)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true")
        elif f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    for name, kind in MODEL_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help="model config override")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out loss/perplexity per loop count")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="text file or prepared .bin shard")
    p.add_argument("--loops", default=None, help="comma-separated loop counts (default 1..max_loops, 2*max)")
    p.add_argument("--context", type=int, default=0, help="window length (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="write a quality-vs-loops PNG here")
    p.add_argument("--write-eval", action="store_true", help="store the results as the checkpoint's eval.json")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default float32; the loss is always summed in float32)")
    p.set_defaults(func=cmd_eval)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare, read_hf_dataset

    if bool(args.input) == bool(args.hf_dataset):
        raise ValueError("give either --input FILE... or --hf-dataset NAME")
    docs = read_hf_dataset(args.hf_dataset, args.hf_split, args.hf_field, args.hf_limit) if args.hf_dataset else None
    inputs = args.input or [f"hf:{args.hf_dataset}:{args.hf_split}"]
    meta = prepare(inputs, args.out, args.tokenizer, args.split, args.val_input, args.val_fraction, docs)
    print(json.dumps(meta, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, model_overrides=overrides)
    result = train(cfg)
    print(json.dumps(result))
    return 0


def parse_loops(text: str | None, max_loops: int, cap: int) -> list[int]:
    if text is None:
        return sorted(set(range(1, max_loops + 1)) | {min(2 * max_loops, cap)})
    try:
        loops = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--loops must be comma-separated integers, got {text!r}") from e
    bad = [n for n in loops if not 1 <= n <= cap]
    if not loops or bad:
        raise ValueError(f"--loops values must be in 1..{cap}, got {text!r}")
    return loops


def cmd_eval(args: argparse.Namespace) -> int:
    from loopgpt.model import load_checkpoint, resolve_device, resolve_dtype

    from .evaluate import evaluate_loops, load_tokens
    from .plots import plot_quality

    device = resolve_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=device, dtype=resolve_dtype(args.dtype, device))
    loops = parse_loops(args.loops, model.config.max_loops, model.config.loop_cap)
    ids = load_tokens(args.data, tokenizer, args.max_tokens)
    results = {"data": str(args.data), "context": args.context or model.config.block_size,
               **evaluate_loops(model, ids, loops, args.context)}
    print(f"{'loops':>5}  {'loss':>8}  {'ppl':>9}  tokens")
    for n, row in results["loops"].items():
        print(f"{n:>5}  {row['loss']:8.4f}  {row['ppl']:9.3f}  {row['tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot_quality({Path(args.checkpoint).name: {k: v["loss"] for k, v in results["loops"].items()}}, args.plot,
                     f"held-out loss vs loops ({Path(args.data).name})")
    if args.write_eval:
        (Path(args.checkpoint) / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.flush()
    return 0

"""The `prepare`, `train` and `eval` subcommands: argparse flags mapped 1:1 onto the dataclasses.

    loopgpt prepare --help; loopgpt train --help; loopgpt eval --help
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

MODEL_FLAGS = {"n_layer": int, "n_head": int, "n_embd": int, "block_size": int, "max_loops": int,
               "inner_loops": int, "gate": str, "dropout": float, "kv_budget": int, "loop_cap": int}


def add_parsers(sub) -> None:
    from loopgpt.model.adaptive import DEFAULT_MEASURE, MEASURES

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
    p.add_argument("--loops", default=None,
                   help="comma-separated loop counts (default 1..max_loops, 2*max), or auto: per-token adaptive depth")
    p.add_argument("--tolerance", default=None,
                   help="with --loops auto: comma-separated convergence tolerances, one evaluation each")
    p.add_argument("--max-loops", type=int, default=None,
                   help="with --loops auto: loop budget per token (default: the trained max_loops)")
    p.add_argument("--min-loops", type=int, default=1, help="with --loops auto: loops every token runs (default 1)")
    p.add_argument("--measure", default=None, choices=MEASURES,
                   help=f"with --loops auto: convergence measure (model/adaptive.py; default {DEFAULT_MEASURE})")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="share K/V slots across loops (loop 0 keeps its own, deeper loops share B-1; 0: one per "
                        "loop) and score token by token through the cache, as decoding sees it")
    p.add_argument("--context", type=int, default=0, help="window length (default: the model's context)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="write a quality-vs-loops PNG here (auto: against fixed loops)")
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


def parse_tolerances(text: str | None) -> list[float]:
    try:
        tols = [float(x) for x in (text or "").split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--tolerance must be comma-separated numbers >= 0, got {text!r}") from e
    if not tols or not all(math.isfinite(t) and t >= 0 for t in tols):
        raise ValueError(f"--tolerance must be comma-separated numbers >= 0, got {text!r}")
    return tols


def check_eval_flags(args: argparse.Namespace, cap: int) -> None:
    """One sentence for flags that do not fit together or the checkpoint (exit 2)."""
    auto = args.loops == "auto"
    if not auto and (args.tolerance is not None or args.max_loops is not None or args.measure is not None
                     or args.min_loops != 1):
        raise ValueError("--tolerance, --max-loops, --min-loops and --measure need --loops auto")
    if auto and args.tolerance is None:
        raise ValueError("--loops auto needs --tolerance T[,T2,...] (a convergence tolerance per evaluation)")
    if auto and args.kv_budget is not None:
        raise ValueError("--kv-budget applies to fixed loop counts; --loops auto is evaluated without a KV budget")
    if args.write_eval and (auto or args.kv_budget is not None):
        raise ValueError("--write-eval stores fixed-depth losses only; drop --loops auto and --kv-budget with it")
    if args.max_loops is not None and not 1 <= args.max_loops <= cap:
        raise ValueError(f"--max-loops must be in 1..{cap} (the checkpoint's loop cap), got {args.max_loops}")
    if not 1 <= args.min_loops <= (args.max_loops or cap):
        raise ValueError(f"--min-loops must be in 1..{args.max_loops or cap} (the budget), got {args.min_loops}")


def cmd_eval(args: argparse.Namespace) -> int:
    from loopgpt.model import load_checkpoint, resolve_device, resolve_dtype

    from .evaluate import evaluate_loops, load_tokens
    from .plots import plot_quality

    device = resolve_device(args.device)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=device, dtype=resolve_dtype(args.dtype, device))
    cfg = model.config
    check_eval_flags(args, cfg.loop_cap)
    if args.loops == "auto":
        return eval_auto(args, model, tokenizer)
    loops = parse_loops(args.loops, cfg.max_loops, cfg.loop_cap)
    if args.kv_budget is not None:
        model.config = cfg.with_kv_budget(args.kv_budget)  # a ConfigError sentence names the range
    ids = load_tokens(args.data, tokenizer, args.max_tokens)
    results = {"data": str(args.data), "context": args.context or cfg.block_size,
               **({} if args.kv_budget is None else {"kv_budget": args.kv_budget, "scoring": "decode"}),
               **evaluate_loops(model, ids, loops, args.context, decode=args.kv_budget is not None)}
    print(f"{'loops':>5}  {'loss':>8}  {'ppl':>9}  {'KV B/token':>10}  tokens")
    for n, row in results["loops"].items():
        print(f"{n:>5}  {row['loss']:8.4f}  {row['ppl']:9.3f}  {row['kv_bytes_per_token']:>10}  {row['tokens']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot_quality({Path(args.checkpoint).name: {k: v["loss"] for k, v in results["loops"].items()}}, args.plot,
                     f"held-out loss vs loops ({Path(args.data).name})")
    if args.write_eval:
        (Path(args.checkpoint) / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.flush()
    return 0


def eval_auto(args: argparse.Namespace, model, tokenizer) -> int:
    """`eval --loops auto`: loss and mean loops per tolerance, beside the fixed-loops curve 1..budget."""
    from loopgpt.model.adaptive import DEFAULT_MEASURE, check_adaptive

    from .evaluate import evaluate_adaptive, evaluate_loops, fixed_loss_at, load_tokens
    from .plots import plot_adaptive

    tols = parse_tolerances(args.tolerance)
    measure = args.measure or DEFAULT_MEASURE
    max_loops, min_loops = check_adaptive(model.config, tols[0], args.max_loops, args.min_loops, measure)
    ids = load_tokens(args.data, tokenizer, args.max_tokens)
    fixed = evaluate_loops(model, ids, list(range(1, max_loops + 1)), args.context)["loops"]
    auto = evaluate_adaptive(model, ids, tols, max_loops, min_loops, measure, args.context)["auto"]
    curve = {int(n): row["loss"] for n, row in fixed.items()}
    for row in auto.values():
        row["fixed_loss_at_mean_loops"] = round(fixed_loss_at(curve, row["mean_loops"]), 6)
        row["delta"] = round(row["loss"] - row["fixed_loss_at_mean_loops"], 6)
    results = {"data": str(args.data), "context": args.context or model.config.block_size, "measure": measure,
               "max_loops": max_loops, "min_loops": min_loops,
               "loops": fixed, "auto": auto}
    print(f"{'loops':>9}  {'loss':>8}  {'seconds':>7}  tokens")
    for n, row in fixed.items():
        print(f"{n:>9}  {row['loss']:8.4f}  {row['seconds']:7.1f}  {row['tokens']}")
    print(f"{'tolerance':>9}  {'loss':>8}  {'mean loops':>10}  {'fixed there':>11}  {'delta':>8}  {'seconds':>7}  "
          f"(measure {measure}, budget {max_loops})")
    for tol, row in auto.items():
        print(f"{tol:>9}  {row['loss']:8.4f}  {row['mean_loops']:10.3f}  {row['fixed_loss_at_mean_loops']:11.4f}  "
              f"{row['delta']:+8.4f}  {row['seconds']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot_adaptive(curve, {f"adaptive ({measure})": {t: (r["mean_loops"], r["loss"]) for t, r in auto.items()}},
                      args.plot, f"held-out loss: adaptive ({measure}) vs fixed loops ({Path(args.data).name})")
    sys.stdout.flush()
    return 0

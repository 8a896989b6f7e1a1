"""The `loopgpt` command line: one console script, one subcommand per job.

    loopgpt --help
    loopgpt --version
    loopgpt info --checkpoint checkpoints/demo
    loopgpt generate --prompt "Once upon a time" --loops 6 --seed 0
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys

from loopgpt import DISTRIBUTION, __version__, demo_checkpoint, install_hint


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 keeps all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def cmd_generate(args: argparse.Namespace) -> int:
    from loopgpt.model import (
        SamplingParams,
        check_request,
        generate_text,
        load_checkpoint,
        resolve_device,
        resolve_dtype,
    )
    from loopgpt.model.memory import check_memory

    # Flag values first, before anything is loaded or written: a bad one is one sentence and nothing else.
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.loops is not None and args.loops < 1:
        raise ValueError(f"--loops must be >= 1, got {args.loops}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.backend == "onnx":
        from loopgpt.export import load_onnx

        model, tokenizer, _ = load_onnx(args.checkpoint)
        device = "cpu"
    else:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer, _ = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
    loops = model.config.max_loops if args.loops is None else args.loops
    n_prompt = len(tokenizer.encode(args.prompt))
    check_request(model, n_prompt, args.max_tokens, loops)
    check_memory(model.config, device, batch=1, max_len=n_prompt + args.max_tokens, loops=loops,
                 dtype_bytes=torch_bytes(model), shrink="--loops or --max-tokens")
    sys.stdout.write(args.prompt)
    completion = None
    for piece, completion in generate_text(  # noqa: B007 (the last completion is read below)
        model, tokenizer, args.prompt, loops, args.max_tokens, params, args.seed, args.stop
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[loops={loops} tokens={len(completion.token_ids)} finish_reason={completion.finish_reason}]",
          file=sys.stderr)
    return 0


def torch_bytes(model) -> int:
    """Bytes per element of the model's weights (4 for the float32 ONNX runner)."""
    weight = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return 4 if weight is None else weight.element_size()


def cmd_info(args: argparse.Namespace) -> int:
    from loopgpt.model import load_checkpoint

    model, tokenizer, evals = load_checkpoint(args.checkpoint)
    cfg = model.config
    print(f"checkpoint   {args.checkpoint}")
    print(f"parameters   {model.num_params():,} (without position embeddings; "
          f"{model.num_params(non_embedding=False):,} in all)")
    print(f"loops        1..{cfg.loop_cap} (trained up to {cfg.max_loops}; inner loops {cfg.inner_loops})")
    print(f"tokenizer    {tokenizer.name} ({tokenizer.n_vocab} tokens)")
    print(f"runtimes     {runtimes()}")
    print("config")
    for key, value in cfg.to_dict().items():
        print(f"  {key:12} {value}")
    if evals:
        print("eval loss by loops")
        for loops, row in sorted(evals.get("loops", {}).items(), key=lambda kv: int(kv[0])):
            print(f"  {loops:>3}  {row['loss']:.4f}")
    return 0


def runtimes() -> str:
    import torch

    parts = [f"torch {torch.__version__} (cuda: {torch.cuda.is_available()})"]
    if importlib.util.find_spec("onnxruntime") is None:
        parts.append("onnxruntime not installed")
    else:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopgpt", description="Train, serve and measure loop-residual GPTs.")
    parser.add_argument("--version", action="version", version=f"loopgpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="one completion to stdout, streamed")
    p.add_argument("--checkpoint", default=demo_checkpoint(), help="checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--loops", type=int, default=None, help="outer loops (default: the trained maximum)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a CUDA device that supports it, else float32")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="onnx: --checkpoint is a `loopgpt export onnx` directory")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="config, parameter count and loops range of a checkpoint")
    p.add_argument("--checkpoint", default=demo_checkpoint(), help="checkpoint directory")
    p.set_defaults(func=cmd_info)

    from loopgpt.loadtest.bench_checkpoint import add_bench_checkpoint_parser

    add_bench_checkpoint_parser(sub)
    optional(sub, "server", ["serve"], add_serve)
    optional(sub, "train", ["prepare", "train", "eval"], lambda s: __import__(
        "loopgpt.train.commands", fromlist=["add_parsers"]).add_parsers(s))
    optional(sub, "loadtest", ["loadtest", "bench"], add_loadtest)
    optional(sub, "export", ["export"], lambda s: __import__(
        "loopgpt.export.command", fromlist=["add_export_parser"]).add_export_parser(s, demo_checkpoint()))
    return parser


def add_serve(sub) -> None:
    from loopgpt.server.serve import add_serve_args, cmd_serve

    p = sub.add_parser("serve", help="HTTP server: streaming, OpenAI-compatible, per-request loops")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve, onnx_loader=load_onnx if importlib.util.find_spec("onnxruntime") else None)


def load_onnx(export_dir):
    """The ONNX runner for `serve --backend onnx`, handed to the server from here (server/ does not import
    export/); imported only when used, so other commands do not pay for onnxruntime."""
    from loopgpt.export.runtime import load_onnx as load

    return load(export_dir)


def add_loadtest(sub) -> None:
    from loopgpt.loadtest.cli import add_bench_parser, add_loadtest_parser

    add_loadtest_parser(sub)
    add_bench_parser(sub, demo_checkpoint())
    sub.choices["bench"].set_defaults(engine=inprocess_engine())


def inprocess_engine():
    """The serving engine driven in-process, for `loopgpt bench` (loadtest/ does not import server/); None when the
    server extra is missing (its rows then say so)."""
    try:
        from loopgpt.server.inprocess import InProcess
    except ImportError:
        return None
    return InProcess


MISSING: dict[str, str] = {}  # subcommand -> why it cannot run here (an extra is not installed)


def optional(sub, extra: str, commands: list[str], register) -> None:
    """Register subcommands whose dependencies come with an extra; without it, say which extra to install."""
    try:
        register(sub)
    except ImportError as e:
        for name in commands:
            sub.add_parser(name, help=f"(needs: {install_hint(extra)})")
            MISSING[name] = f"this command needs the '{extra}' extra ({e.name or e} is not installed): " \
                            f"{install_hint(extra)}"


def extra_for(module: str) -> str | None:
    """The first extra of this distribution (in pyproject.toml's order) that installs `module`, read from the
    installed metadata; None when no extra does (then a missing module is a bug, and its traceback is wanted)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        requirements = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return None
    top = module.partition(".")[0].lower()
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra and re.split(r"[\[<>=!~ ]", name.strip(), maxsplit=1)[0].lower().replace("-", "_") == top:
            return extra.group(1)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in MISSING:
        print(f"loopgpt {argv[0]}: error: {MISSING[argv[0]]}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, inside the try: a closed pipe shows now, not in the interpreter's exit
        return code
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, ConfigError, MemoryBudgetError, bad flags
        print(f"loopgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a part of the command that needs an extra (bench's HF row: transformers)
        extra = extra_for(e.name or "")
        if extra is None:
            raise
        print(f"loopgpt {args.command}: error: this needs {e.name}, which is not installed: {install_hint(extra)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `loopgpt info | head`: the reader left, which is not an error of ours
        # Point stdout at /dev/null so that the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # what a shell reports for a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())

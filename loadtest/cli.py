"""`loopgpt loadtest` and `loopgpt bench`: argument parsers and the commands behind them.

    loopgpt loadtest --url http://127.0.0.1:8000 --concurrency 4 --requests 40 --loops 1,2,4,6
    loopgpt loadtest --url http://127.0.0.1:8000 --rate 5 --duration 30 --loops 1:3,6:1 --json lt.json
    loopgpt loadtest --url http://127.0.0.1:8001 --url http://127.0.0.1:8002 --concurrency 8 --requests 80
    loopgpt bench --checkpoint checkpoints/demo --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from .client import ENDPOINTS


def add_loadtest_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="load a running server; per-loops latency, throughput and quality")
    p.add_argument("--url", required=True, action="append",
                   help="server base URL, e.g. http://127.0.0.1:8000 (or a router's); repeat it, or separate URLs "
                        "by commas, to spread requests round-robin over several replicas")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight (default 1)")
    mode.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--requests", type=int, help="stop after this many requests")
    stop.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--loops", default="1", help="loops mix: 1,2,4,6 or weighted 1:3,6:1 (default 1)")
    p.add_argument("--prompts", default=None, help="text file split into documents (default: built-in prompts)")
    p.add_argument("--prompt-chars", type=int, default=400, help="cut each prompt to this many characters")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="every prompt starts with the same N tokens (a prefix cache's case; default 0: none)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--endpoint", choices=ENDPOINTS, default="generate", help="/generate or /v1/completions")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, loops and prompt choices")
    p.add_argument("--json", default=None, help="write config, summary and every request here")
    p.add_argument("--plot", default=None, help="write a latency/quality-vs-loops PNG here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .report import plot, replica_table, table, write_json
    from .runner import BUILTIN_PROMPTS, LoadConfig, load_prompts, parse_loops_mix, run_load, with_shared_prefix
    from .stats import summarize_by_loops

    prompts = load_prompts(args.prompts, args.prompt_chars) if args.prompts else list(BUILTIN_PROMPTS)
    if args.shared_prefix < 0:
        raise ValueError(f"--shared-prefix must be >= 0 tokens, got {args.shared_prefix}")
    if args.shared_prefix:
        prompts = with_shared_prefix(args.url[0].split(",")[0], prompts, args.shared_prefix, args.api_key)
    cfg = LoadConfig(url=",".join(args.url), loops_mix=parse_loops_mix(args.loops), prompts=prompts,
                     max_tokens=args.max_tokens, temperature=args.temperature, concurrency=args.concurrency,
                     rate=args.rate, requests=args.requests, duration=args.duration, timeout=args.timeout,
                     api_key=args.api_key, endpoint=args.endpoint, seed=args.seed, progress=not args.quiet)
    records, duration = asyncio.run(run_load(cfg))
    summary = summarize_by_loops(records, duration)
    mode = f"open loop {cfg.rate}/s" if cfg.rate else f"closed loop x{cfg.concurrency}"
    print(f"{len(records)} requests in {duration:.1f} s ({mode}, {cfg.endpoint}, max_tokens {cfg.max_tokens})")
    print(table(summary))
    if summary["by_replica"]:
        print(replica_table(summary["by_replica"]))
    if args.json:
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("prompts", "api_key")}
        config["n_prompts"] = len(prompts)
        write_json(args.json, config, summary, duration, [r.to_dict() for r in records])
    if args.plot:
        plot(args.plot, summary, title=f"{cfg.url} ({mode})")
    if summary["overall"]["ok"] == 0:
        first = next(r.error for r in records if r.error)
        print(f"loopgpt loadtest: error: no request succeeded; the first failure was: {first}", file=sys.stderr)
        return 1
    return 0


def add_bench_parser(sub, default_checkpoint: str) -> None:
    p = sub.add_parser("bench", help="throughput/latency ratios against the alternatives, measured in one run")
    p.add_argument("--checkpoint", default=default_checkpoint, help="checkpoint directory")
    p.add_argument("--rows", default="1,2,3,4,5,6,7,8,9", help="which benchmark rows to run (default all)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (default 5)")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per repetition (default 64)")
    p.add_argument("--onnx", default=None, help="ONNX export directory for row 5 (default: export it to a temp dir)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every contender (default 1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype for every contender (auto: float32 on the CPU rows, bfloat16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="row 1 also times the engine with --compile")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    try:
        rows = {int(r) for r in args.rows.split(",") if r.strip()}
    except ValueError:
        raise ValueError(f"--rows takes numbers 1..9 separated by commas, got {args.rows!r}") from None
    return run_bench(args.checkpoint, rows, args.reps, args.tokens, args.json, args.onnx, args.threads, args.dtype,
                     args.engine, args.compile)

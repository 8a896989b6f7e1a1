"""`loopgpt loadtest` and `loopgpt bench`: argument parsers and the commands behind them.

    loopgpt loadtest --url http://127.0.0.1:8000 --concurrency 4 --requests 40 --loops 1,2,4,6
    loopgpt loadtest --url http://127.0.0.1:8000 --rate 5 --duration 30 --loops 1:3,6:1 --json lt.json
    loopgpt loadtest --url http://127.0.0.1:8001 --url http://127.0.0.1:8002 --concurrency 8 --requests 80
    loopgpt loadtest --url http://127.0.0.1:8000 --endpoint completions --sweep 1,4,16,32 --rounds 4 --loops 6 \
        --max-tokens 64 --temperature 0 --ignore-eos --prompt-tokens 32:64
    loopgpt loadtest --url http://127.0.0.1:8000 --endpoint completions --concurrency 16 --rounds 4 --mixed
    loopgpt bench --checkpoint checkpoints/demo --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import httpx

from .client import ENDPOINTS
from .runner import LoadConfig
from .sweep import parse_levels


def add_loadtest_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="load a running server; per-loops latency, throughput and quality")
    p.add_argument("--url", required=True, action="append",
                   help="server base URL, e.g. http://127.0.0.1:8000 (or a router's); repeat it, or separate URLs "
                        "by commas, to spread requests round-robin over several replicas")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight (default 1)")
    mode.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    mode.add_argument("--sweep", default=None, help="closed loops at each of these concurrencies in turn, e.g. "
                      "1,4,16,32: one markdown row per level (tok/s, TTFT and ITL p50/p99, server CPU cores)")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--requests", type=int, help="stop after this many requests (per level with --sweep)")
    stop.add_argument("--duration", type=float, help="stop sending after this many seconds (per level with --sweep)")
    stop.add_argument("--rounds", type=int, help="closed loop: each stream sends this many requests (concurrency x "
                      "rounds in all, per level with --sweep)")
    p.add_argument("--loops", default=None, help="loops mix: 1,2,4,6 or weighted 1:3,6:1 (default 1)")
    p.add_argument("--mixed", action="store_true", help="closed loop: run the load twice, loops {1,2,4,6} mixed and "
                   "all at 6, and report the tok/s gain against theory (per level with --sweep)")
    p.add_argument("--prompts", default=None, help="text file split into documents (default: built-in prompts)")
    p.add_argument("--prompt-chars", type=int, default=400, help="cut each prompt to this many characters")
    p.add_argument("--prompt-tokens", default=None, help="prompts of this many tokens of the served model, e.g. "
                   "32:64 (a range, uniform) or 48: windows of the prompt texts, cut by the server's /tokenize")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="every prompt starts with the same N tokens (a prefix cache's case; default 0: none), "
                   "then its own text (sized by --prompt-tokens when given)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--ignore-eos", action="store_true", help="every request generates --max-tokens tokens (the "
                   "server's ignore_eos): equal work per request")
    p.add_argument("--endpoint", choices=ENDPOINTS, default="generate", help="/generate or /v1/completions")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, loops and prompt choices")
    p.add_argument("--json", default=None, help="write config, summary and every request here")
    p.add_argument("--plot", default=None, help="write a latency/quality-vs-loops PNG here (not with --sweep or "
                   "--mixed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_loadtest)


def levels(args: argparse.Namespace) -> list[int]:
    """The closed loop's concurrency levels: --sweep's, else --concurrency alone."""
    return parse_levels(args.sweep) if args.sweep is not None else [args.concurrency]


def load_config(args: argparse.Namespace) -> LoadConfig:
    """The run's LoadConfig from the flags (its prompts cut to --prompt-tokens by the server), at the first level;
    every bad flag is one ValueError sentence before any load is sent."""
    from .probe import parse_token_range, sized_prompts
    from .runner import BUILTIN_PROMPTS, load_prompts, parse_loops_mix, with_shared_prefix

    if args.rounds is not None and (args.rounds < 1 or args.rate is not None):
        raise ValueError("--rounds takes a count >= 1 of requests per stream, for a closed loop (not with --rate)")
    if args.mixed and (args.rate is not None or args.loops is not None):
        raise ValueError("--mixed sets the loops itself ({1,2,4,6} against all at 6) and needs a closed loop: "
                         "drop --loops and --rate")
    if (args.sweep is not None or args.mixed) and args.plot:
        raise ValueError("--plot draws one run's loops; it does not combine with --sweep or --mixed")
    first = levels(args)[0]
    prompts = load_prompts(args.prompts, args.prompt_chars) if args.prompts else list(BUILTIN_PROMPTS)
    if args.shared_prefix < 0:
        raise ValueError(f"--shared-prefix must be >= 0 tokens, got {args.shared_prefix}")
    cfg = LoadConfig(url=",".join(args.url), loops_mix=parse_loops_mix(args.loops or "1"), prompts=prompts,
                     max_tokens=args.max_tokens, temperature=args.temperature, concurrency=first,
                     rate=args.rate, requests=args.rounds * first if args.rounds else args.requests,
                     duration=args.duration, timeout=args.timeout, api_key=args.api_key, endpoint=args.endpoint,
                     seed=args.seed, progress=not args.quiet, ignore_eos=args.ignore_eos)
    if args.prompt_tokens is not None:
        low, high = parse_token_range(args.prompt_tokens)

        async def fetch() -> list[str]:
            headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
            async with httpx.AsyncClient(headers=headers, timeout=30) as client:
                return await sized_prompts(client, cfg.urls[0], prompts, low, high, cfg.seed)

        cfg = dataclasses.replace(cfg, prompts=asyncio.run(fetch()))
    if args.shared_prefix:  # after the sizing: --prompt-tokens sizes what follows the prefix
        cfg = dataclasses.replace(cfg, prompts=with_shared_prefix(cfg.urls[0], cfg.prompts, args.shared_prefix,
                                                                  args.api_key))
    return cfg


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .report import plot, replica_table, table, write_json
    from .runner import run_load
    from .stats import summarize_by_loops

    cfg = load_config(args)
    if args.sweep is not None or args.mixed:
        return run_sweep(args, cfg)
    records, duration = asyncio.run(run_load(cfg))
    summary = summarize_by_loops(records, duration)
    mode = f"open loop {cfg.rate}/s" if cfg.rate else f"closed loop x{cfg.concurrency}"
    print(f"{len(records)} requests in {duration:.1f} s ({mode}, {cfg.endpoint}, max_tokens {cfg.max_tokens})")
    print(table(summary))
    if summary["by_replica"]:
        print(replica_table(summary["by_replica"]))
    if args.json:
        write_json(args.json, config_dict(cfg), summary, duration, [r.to_dict() for r in records])
    if args.plot:
        plot(args.plot, summary, title=f"{cfg.url} ({mode})")
    return failed(records)


def run_sweep(args: argparse.Namespace, cfg: LoadConfig) -> int:
    from .sweep import DEEP, MIXED, mixed_table, run_levels, sweep_table, write_sweep_json

    mixes = [MIXED, DEEP] if args.mixed else [cfg.loops_mix]
    done = asyncio.run(run_levels(cfg, levels(args), mixes, args.rounds))
    print(f"closed loop, {cfg.endpoint}, max_tokens {cfg.max_tokens}, temperature {cfg.temperature}"
          f"{', ignore_eos' if cfg.ignore_eos else ''}; {len(cfg.prompts)} prompts"
          f"{f' of {args.prompt_tokens} tokens' if args.prompt_tokens else ''}\n")
    print(sweep_table(done))
    if args.mixed:
        print("\n" + mixed_table(done))
    if args.json:
        write_sweep_json(args.json, config_dict(cfg), done)
    return max(failed(level.records) for level in done)


def config_dict(cfg: LoadConfig) -> dict:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("prompts", "api_key")}
    config["n_prompts"] = len(cfg.prompts)
    return config


def failed(records: list) -> int:
    """1 with one sentence when no request of a run succeeded, else 0."""
    if any(r.ok for r in records):
        return 0
    first = next((r.error for r in records if r.error), "no request was sent")
    print(f"loopgpt loadtest: error: no request succeeded; the first failure was: {first}", file=sys.stderr)
    return 1


def add_bench_parser(sub, default_checkpoint: str) -> None:
    p = sub.add_parser("bench", help="throughput/latency ratios against the alternatives, measured in one run")
    p.add_argument("--checkpoint", action="append", default=None,
                   help="checkpoint directory; repeat it to run every row on each in turn, e.g. the demo and "
                        f"`loopgpt bench-checkpoint`'s GPT-2-vocabulary one (default {default_checkpoint})")
    p.set_defaults(default_checkpoint=default_checkpoint)
    p.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10", help="which benchmark rows to run (default all)")
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
        raise ValueError(f"--rows takes numbers 1..10 separated by commas, got {args.rows!r}") from None
    return run_bench(args.checkpoint or [args.default_checkpoint], rows, args.reps, args.tokens, args.json,
                     args.onnx, args.threads, args.dtype, args.engine, args.compile)

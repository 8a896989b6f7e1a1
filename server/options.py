"""ServerOptions: every `loopgpt serve` setting, its default and its help written once, as a dataclass field;
the command's flags are generated from it (as `train/commands.py` does for TrainConfig).

A new setting is one line: `name: type = option(default, "help", choices=...)`; it becomes `--name`
(a bool that defaults to True becomes `--no-name`), validated in `__post_init__` if it needs a range.

    loopgpt serve --help
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CHECKPOINT = "checkpoints/demo"  # the CLI passes the installed demo's absolute path instead
SPEC_TOKENS_MAX = 16  # drafts in flight per request: each is a KV-cache lane, and acceptance falls with each one


def option(default: Any, help: str, **flag: Any) -> Any:
    """A field with its flag's help text; `flag` holds extra argparse arguments (`choices`) and `env`, the
    environment variable read when the flag is not given."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class ServerOptions:
    checkpoint: str = option(DEFAULT_CHECKPOINT, "checkpoint directory (or ONNX export directory with --backend onnx)")
    served_model_name: list[str] | None = option(None, "the names the model answers to in a request's `model` "
                                                 "(also NAME:loops=N); the first is the one /v1/models and responses "
                                                 "report (default: the checkpoint directory's name)", nargs="+",
                                                 metavar="NAME")
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "TCP port to listen on")
    backend: str = option("torch", "model runtime", choices=("torch", "onnx"))
    device: str = option("auto", "device for the model", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "weights, activations and KV cache (auto: bfloat16 on a CUDA device that supports it "
                        "or a CPU with native bf16 matmul, AVX512-BF16 or AMX, else float32); sampling and NLL "
                        "metrics are always float32",
                        choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = option(False, "torch.compile the decode step and the sampling head (opt-in; eager is the "
                           "reference)")
    cuda_graphs: bool = option(False, "capture the decode step per batch/context bucket as CUDA graphs and replay "
                               "them (CUDA only)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on generation routes and /v1/models; "
                                 "visible to other users in `ps`: prefer $LOOPGPT_API_KEY or --api-key-file",
                                 env="LOOPGPT_API_KEY")
    api_key_file: str | None = option(None, "read the API key from this file (first line), instead of --api-key")
    max_batch: int = option(8, "KV-cache rows: requests decoded together")
    max_queue: int = option(64, "requests waiting for a row before 429")
    max_body: int = option(1 << 20, "request body limit in bytes (413 above)")
    loop_cap: int = option(0, "largest loop count a request may ask for, at most the checkpoint's loop_cap "
                           "(0: the checkpoint's); the KV cache holds one slot per loop, so this shrinks it")
    max_context: int = option(0, "context in tokens (prompt + max_tokens), at most the checkpoint's block_size "
                              "(0: the checkpoint's); shrinks the KV cache")
    kv_budget: int = option(-1, "K/V slots kept per layer across loops: 0 one per loop; B >= 1 loop 0 keeps its own "
                            "and the deeper loops share B - 1 (K/V memory per token falls to B of the loops; costs "
                            "quality, measured in docs/results.md; no self-speculation); -1 the checkpoint's")
    prefix_cache: bool = option(True, "keep prompt prefixes (16-token blocks, at the depth they were computed at) "
                                "across requests: a prompt that starts like an earlier one prefills only the rest, "
                                "at any depth up to the earlier one's (not with --kv-budget, adaptive requests or "
                                "prompt logprobs)")
    prefix_cache_mb: float = option(-1.0, "memory of the prefix cache in MiB, least recently used blocks evicted "
                                    "first (-1: a quarter of the KV cache's; 0: off)")
    shutdown_grace: float = option(10.0, "seconds running streams may finish after SIGTERM before they are aborted")
    header_timeout: float = option(10.0, "seconds a client has to send a request's line and headers (slow-header "
                                   "clients are answered 408 and disconnected; server/protocol.py)")
    prefill_chunk: int = option(128, "prompt tokens prefilled per engine step (chunked prefill): smaller keeps running "
                                "streams smooth while long prompts arrive, larger prefills faster")
    speculative: str = option("off", "self-speculative decoding for requests that do not say (their "
                              "`speculative` field): off, or auto (drafts from the request's own early loops)",
                              choices=("off", "auto"))
    adaptive_tolerance: float = option(0.01, "loops \"auto\" requests that give no tolerance: a token stops once "
                                       "1 - cosine of its consecutive states is below this (0.01: 3.5 loops a token "
                                       "on the demo at fixed-6 quality minus 0.03 nats; docs/results.md)")
    adaptive_min_loops: int = option(2, "loops \"auto\" requests that give no min_loops: loops every token runs "
                                     "(one loop's change from the embedding says little)")
    spec_tokens: int = option(3, "draft tokens a speculating request may keep in flight (each one a lane of its "
                              "own); 0 turns self-speculative decoding off")
    prompt_nll: float = option(0.1, "fraction of requests whose prompt is scored (the prompt_nll metric and field): "
                               "the head at every prompt position is the largest matmul of a prefill on a real "
                               "vocabulary; 1 scores every prompt, 0 none (echo with logprobs is always scored)")
    engine: str = option("process", "where the engine runs: its own process (the model's threads never wait for the "
                         "API's GIL) or a thread of the API process (one process; the tests' and `bench`'s way)",
                         choices=("process", "thread"))
    threads: int = option(0, "CPU threads for the model (0: cores - 1, leaving one for HTTP; oversubscribed OpenMP "
                          "threads spin and can make decoding many times slower)")
    log_level: str = option("info", "log level", choices=("debug", "info", "warning", "error"))
    replica_name: str | None = option(None, "name sent in the x-loopgpt-replica response header (a Ray replica, a "
                                      "pod), so a client behind a router can count who served it",
                                      env="LOOPGPT_REPLICA")

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.kv_budget < -1:
            raise ValueError(f"--kv-budget must be >= 0 (or -1 for the checkpoint's), got {self.kv_budget}")
        if not self.adaptive_tolerance >= 0 or self.adaptive_min_loops < 1:
            raise ValueError("--adaptive-tolerance must be >= 0 and --adaptive-min-loops >= 1, got "
                             f"{self.adaptive_tolerance} and {self.adaptive_min_loops}")
        if not 0 <= self.spec_tokens <= SPEC_TOKENS_MAX:
            raise ValueError(f"--spec-tokens must be in 0..{SPEC_TOKENS_MAX}, got {self.spec_tokens}")
        if not self.header_timeout > 0:
            raise ValueError(f"--header-timeout must be > 0 seconds, got {self.header_timeout}")
        for name in ("loop_cap", "max_context"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{flag_name(name)} must be >= 1 (or 0 for the checkpoint's), got {value}")
        if not 0 <= self.prompt_nll <= 1:
            raise ValueError(f"--prompt-nll must be in 0..1 (a fraction of requests), got {self.prompt_nll}")
        if self.prefix_cache_mb < 0 and self.prefix_cache_mb != -1:
            raise ValueError(f"--prefix-cache-mb must be >= 0 (or -1 for a quarter of the KV cache's memory), got "
                             f"{self.prefix_cache_mb}")
        if self.shutdown_grace < 0:
            raise ValueError(f"--shutdown-grace must be >= 0, got {self.shutdown_grace}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 1 (or 0 for cores - 1), got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key_file:
            if self.api_key:
                raise ValueError("give --api-key (or $LOOPGPT_API_KEY) or --api-key-file, not both")
            self.api_key = read_key_file(self.api_key_file)
        self.api_key = self.api_key or None  # an empty key means no key, as an unset variable does
        if isinstance(self.served_model_name, str):  # one name, as a Ray Serve config may give it
            self.served_model_name = [self.served_model_name]
        for name in self.served_model_name or []:
            if not name.strip() or ":loops=" in name:
                raise ValueError(f"--served-model-name takes non-empty names without ':loops=' (a client adds that "
                                 f"to name a depth), got {name!r}")


def read_key_file(path: str) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({e.strerror if isinstance(e, OSError) else e})") \
            from e
    key = lines[0].strip() if lines else ""
    if not key:
        raise ValueError(f"--api-key-file {path}: the file is empty; put the key on its first line")
    return key


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """One flag per ServerOptions field; `defaults` overrides a field's default (the CLI's demo path)."""
    for f in dataclasses.fields(ServerOptions):
        meta = dict(f.metadata)
        help_text, env = meta.pop("help"), meta.pop("env", None)
        default = (defaults or {}).get(f.name, f.default)
        if isinstance(default, bool):
            flag = flag_name(f.name) if not default else "--no-" + f.name.replace("_", "-")
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default,
                                help=("do not " if default else "") + help_text)
            continue
        shown = f"${env}" if env else default
        suffix = f" (default: {shown})" if shown is not None else ""
        # A flag backed by an environment variable defaults to None here and is read in options_from_args, so
        # that a value from the environment is never confused with one typed on the command line.
        parser.add_argument(flag_name(f.name), dest=f.name, type=str if default is None else type(default),
                            default=None if env else default, help=help_text + suffix, **meta)


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerOptions)}
    for f in dataclasses.fields(ServerOptions):
        env = f.metadata.get("env")
        if env and values[f.name] is None:
            values[f.name] = os.environ.get(env)
    return ServerOptions(**values)

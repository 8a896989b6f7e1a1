"""Every `loopgpt serve` setting, its default, its help and its environment variable written once, as a dataclass
field: ServerOptions (one server) and RayOptions (`--ray`: several behind Ray Serve). The command's flags, the
LOOPGPT_ variables and the table in docs/configuration.md are all generated from these fields.

A new setting is one line: `name: type = option(default, "help", choices=...)`; it becomes `--name` (a bool
that defaults to True becomes `--no-name`) and `$LOOPGPT_NAME`, validated in `__post_init__` if it needs a range.
A flag beats its variable; a variable beats the default; an empty variable counts as unset.

    loopgpt serve --help
    LOOPGPT_MAX_BATCH=16 loopgpt serve
    python -m loopgpt.server.options --write docs/configuration.md    # regenerate the configuration table
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopgpt import demo_checkpoint

ENV_PREFIX = "LOOPGPT_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
NOT_FLAGS = ("help", "type", "shown", "env_fallback")  # metadata for us, not for argparse
SPEC_TOKENS_MAX = 16  # drafts in flight per request: each is a KV-cache lane, and acceptance falls with each one


def option(default: Any, help: str, **flag: Any) -> Any:
    """A field with its flag's help text. `flag` holds extra argparse arguments (`choices`, `metavar`, `nargs`) and:
    `type` (the value type when the default is None), `shown` (the default as the docs show it, when the value
    depends on the machine) and `env_fallback` (another variable read when LOOPGPT_NAME is unset)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class ServerOptions:
    checkpoint: str = option(demo_checkpoint(), "checkpoint directory (or ONNX export directory with --backend onnx)",
                             shown="checkpoints/demo")
    served_model_name: list[str] | None = option(None, "the names the model answers to in a request's `model` "
                                                 "(also NAME:loops=N); the first is the one /v1/models and responses "
                                                 "report (default: the checkpoint directory's name)", nargs="+",
                                                 metavar="NAME", type=str)
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
                                 type=str)
    api_key_file: str | None = option(None, "read the API key from this file (first line), instead of --api-key",
                                      type=str)
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
                                    "first (-1: the KV cache's size on a CPU, a quarter of it on a GPU; 0: off)")
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
                                      type=str)

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
            raise ValueError(f"--prefix-cache-mb must be >= 0 (or -1 for the default size), got "
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


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass
class RayOptions:
    """`loopgpt serve --ray`: the flag group that scales one server out to Ray Serve replicas (server/scale_out.py
    checks it, server/ray_serve.py runs it)."""

    ray: bool = option(False, "serve through Ray Serve: several replicas, each its own engine with --threads torch "
                       "threads (default 1 under --ray), behind Ray's HTTP proxy on --host/--port")
    replicas: int | None = option(None, "with --ray: a fixed number of replicas (default 1)", type=int)
    autoscale: str | None = option(None, "with --ray: let Ray's autoscaler keep between MIN and MAX replicas (MIN may "
                                   "be 0)", type=str, metavar="MIN:MAX")
    target_ongoing: int | None = option(None, "with --autoscale: requests per replica that Ray scales towards "
                                        "(default --max-batch)", type=int)
    ray_address: str | None = option(None, "join this Ray cluster ('auto', or host:port) instead of starting a local "
                                     "one (also read from $RAY_ADDRESS, Ray's own variable)", type=str,
                                     env_fallback="RAY_ADDRESS")
    gpus_per_replica: float | None = option(None, "with --ray: GPUs each replica reserves (default 1 when serving on "
                                            "CUDA, else 0)", type=float)
    metrics_port: int = option(0, "with --ray: port of each replica's own /metrics endpoint (0: any free port, "
                               "published for Prometheus in --metrics-sd-dir)")
    metrics_sd_dir: str = option("/tmp/loopgpt-prometheus-sd", "with --ray: where each replica writes its "
                                 "Prometheus file_sd target")


def value_type(f: dataclasses.Field) -> type:
    """The type of one value of the field: the default's, or `type` in its metadata when the default is None."""
    return f.metadata.get("type") or type(f.default)


def flag_of(f: dataclasses.Field) -> str:
    """The field's flag: `--name`, or `--no-name` for a bool that defaults to True."""
    return "--no-" + f.name.replace("_", "-") if value_type(f) is bool and f.default else flag_name(f.name)


def shown_default(f: dataclasses.Field) -> str | None:
    if "shown" in f.metadata:
        return f.metadata["shown"]
    return None if f.default is None else str(f.default)


def add_option_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type = ServerOptions) -> None:
    """One flag per field of `cls`. Every flag defaults to None here, so that options_from_args can tell a value
    typed on the command line from one to take from the environment or the dataclass."""
    for f in dataclasses.fields(cls):
        meta = {k: v for k, v in f.metadata.items() if k not in NOT_FLAGS}
        shown = shown_default(f)
        where = f"default: {shown}; " if shown is not None and value_type(f) is not bool else ""
        help_text = f"{f.metadata['help']} ({where}env {env_name(f.name)})".replace("%", "%%")
        if value_type(f) is bool:
            parser.add_argument(flag_of(f), dest=f.name, action="store_const", const=not f.default, default=None,
                                help=("do not " if f.default else "") + help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, type=value_type(f), default=None, help=help_text,
                                **meta)


def from_env(f: dataclasses.Field) -> tuple[str, Any] | None:
    """(variable, value) of the field's environment variable, or None when it is unset or empty; a value that
    does not parse is one sentence naming the variable."""
    for var in (env_name(f.name), f.metadata.get("env_fallback")):
        raw = os.environ.get(var) if var else None
        if raw is not None and raw.strip():
            break
    else:
        return None
    kind, text = value_type(f), raw.strip()
    if kind is bool:
        if text.lower() not in TRUE + FALSE:
            raise ValueError(f"${var} must be one of {', '.join(TRUE + FALSE)}, got {raw!r}")
        return var, text.lower() in TRUE
    items = text.replace(",", " ").split() if f.metadata.get("nargs") else [text]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"${var} must be {what}, got {raw!r}") from None
    choices = f.metadata.get("choices")
    if choices and any(v not in choices for v in values):
        raise ValueError(f"${var} must be one of {', '.join(map(str, choices))}, got {raw!r}")
    return var, values if f.metadata.get("nargs") else values[0]


def options_from_args(args: argparse.Namespace, cls: type = ServerOptions) -> Any:
    """The options the command line and the environment give (flag > LOOPGPT_ variable > default), validated.
    The values are written back into `args`, so code that reads `args.port` sees what the options hold."""
    values, env_of = {}, {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is None and (env := from_env(f)) is not None:
            env_of[f.name], given = env
        if given is not None:
            values[f.name] = given
    try:
        options = cls(**values)
    except ValueError as e:  # a range check names the flag; say which variable set it when one did
        var = next((v for name, v in env_of.items() if flag_name(name) in str(e)), None)
        raise ValueError(f"{e} (from ${var})" if var else str(e)) from None
    for f in dataclasses.fields(cls):
        setattr(args, f.name, getattr(options, f.name))
    return options


def options_markdown() -> str:
    """The table of every `serve` flag for docs/configuration.md (tests/test_docs.py checks it is current)."""
    rows = ["| flag | environment variable | default | what |", "|---|---|---|---|"]
    for cls in (ServerOptions, RayOptions):
        for f in dataclasses.fields(cls):
            boolean, choices = value_type(f) is bool, f.metadata.get("choices")
            flag = flag_of(f) if boolean else flag_of(f) + " " + (
                "|".join(map(str, choices)) if choices else f.metadata.get("metavar", f.name.upper()))
            env = f"`{env_name(f.name)}`" + (f" (or `{f.metadata['env_fallback']}`)" if "env_fallback" in
                                               f.metadata else "")
            shown = shown_default(f)
            default = "off" if boolean and not f.default else "on" if boolean else f"`{shown}`" if shown else ""
            cells = (f"`{flag}`", env, default, f.metadata["help"])
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # a | would end the cell
    return "\n".join(rows) + "\n"


BEGIN, END = "<!-- options: begin (generated) -->", "<!-- options: end -->"


def write_markdown(path: str) -> None:
    """Replace the generated table between BEGIN and END in `path`."""
    text = Path(path).read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    Path(path).write_text(f"{head}{BEGIN}\n{options_markdown()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_markdown(sys.argv[2])
    else:
        sys.stdout.write(options_markdown())

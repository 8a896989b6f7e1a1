"""Loading a checkpoint for serving (`Loaded`), the server's caps on its config, and the engine built over it: the
one place that turns `ServerOptions` into a runner and an engine, whichever process runs them.

    python -c "from loopgpt.server.engine.loading import load_backend; print(load_backend('checkpoints/demo'))"
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loopgpt.model import Tokenizer, load_checkpoint, resolve_device, resolve_dtype
from loopgpt.model.memory import check_memory

from loopgpt import install_hint

log = logging.getLogger("loopgpt.server")
KV_SHRINK = "--max-batch, --loop-cap, --max-context or --kv-budget"


class BackendError(ValueError):
    """A backend or device that cannot be used; the message says what to do instead."""


ONNX_MISSING = f"--backend onnx needs the ONNX runtime: {install_hint('export')}"


@dataclass
class Loaded:
    """What `loopgpt serve` needs from a checkpoint, whatever the backend."""

    model: Any  # a loopgpt.model.forward.LoopModel: LoopGPT or the ONNX runner
    tokenizer: Tokenizer
    evals: dict | None
    name: str
    device: str
    dtype: torch.dtype = torch.float32
    chat_template: str | None = None  # the checkpoint's chat_template.jinja (server/chat.py), if it has one
    engine: Any = None  # an EngineClient when the model lives in the engine process (`model` is then its Described)


def load_backend(checkpoint: str | Path, backend: str = "torch", device: str = "auto", dtype: str = "auto",
                 onnx_loader: Callable | None = None) -> Loaded:
    """Load a checkpoint (torch) or an export directory (onnx) for serving.

    `onnx_loader` is `loopgpt.export.runtime.load_onnx`, handed in by the CLI: server/ does not import
    export/ (parts meet only through model/)."""
    name = Path(checkpoint).resolve().name
    if backend == "torch":
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model, tokenizer, evals = load_checkpoint(checkpoint, device=dev, dtype=dt)
        return Loaded(model, tokenizer, evals, name, dev, dt, chat_template(checkpoint))
    if backend == "onnx":
        if onnx_loader is None:
            raise BackendError(ONNX_MISSING)
        if dtype not in ("auto", "float32"):
            raise BackendError(f"--backend onnx runs the exported float32 graphs; --dtype {dtype} is torch-only")
        runner, tokenizer, evals = onnx_loader(checkpoint)
        return Loaded(runner, tokenizer, evals, name, "cpu", chat_template=chat_template(checkpoint))
    raise BackendError(f"--backend must be torch or onnx, got {backend!r}")


def chat_template(directory: str | Path) -> str | None:
    """The text of a checkpoint's `chat_template.jinja` (read here, compiled by the server), or None."""
    path = Path(directory) / "chat_template.jinja"
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise BackendError(f"{path}: cannot read the chat template ({e})") from e



def serving_config(cfg: Any, loop_cap: int, max_context: int) -> Any:
    """The checkpoint's config with the server's caps (0: keep the checkpoint's); the model and the KV cache
    read their limits from it, so a smaller cap is a smaller cache."""
    if loop_cap and not cfg.max_loops <= loop_cap <= cfg.loop_cap:
        raise ValueError(f"--loop-cap must be in {cfg.max_loops}..{cfg.loop_cap} for this checkpoint (its trained "
                         f"loops .. its loop_cap), got {loop_cap}")
    if max_context and not 2 <= max_context <= cfg.block_size:
        raise ValueError(f"--max-context must be in 2..{cfg.block_size} for this checkpoint, got {max_context}")
    return dataclasses.replace(cfg, loop_cap=loop_cap or cfg.loop_cap, block_size=max_context or cfg.block_size)


def prefix_cache_bytes(cfg: Any, opt: Any, dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
    """--prefix-cache-mb in bytes. By default as much as the KV cache's memory on a CPU, a quarter of it on a GPU:
    the cache's rows hold the live requests, the prefix cache what they may share. Host memory is plentiful and an
    evaluation's shared contexts come back far apart (lm-eval sorts its requests by length): on tinystories_next a
    quarter kept 31% of the prompt tokens, the whole share 45%, 512 MiB no more (docs/architecture.md). On a GPU
    the memory is the KV cache's own, so its default stays a quarter (not measured there)."""
    if not opt.prefix_cache or opt.prefix_cache_mb == 0:
        return 0
    if opt.prefix_cache_mb < 0:
        kv = cfg.kv_cache_bytes(opt.max_batch + 1, dtype_bytes=torch.finfo(dtype).bits // 8)
        return kv // 4 if torch.device(device).type == "cuda" else kv
    return int(opt.prefix_cache_mb * 2**20)


def build_engine(loaded: Loaded, opt: Any, max_queue: int | None = None) -> Any:
    """The runner and engine over a loaded model, under the server's caps (`loaded.model.config` becomes the
    serving config); not started. `max_queue` None: the options' (an engine behind a process boundary gets its
    queue limit checked on the API side and takes everything it is sent)."""
    from .core import Engine  # the engine imports this module's types
    from .runner import ModelRunner

    loaded.model.config = serving_config(loaded.model.config, opt.loop_cap, opt.max_context)
    if opt.kv_budget >= 0:  # a ConfigError sentence names the range
        loaded.model.config = loaded.model.config.with_kv_budget(opt.kv_budget)
    prefix = prefix_cache_bytes(loaded.model.config, opt, loaded.dtype, loaded.device)
    check_memory(loaded.model.config, loaded.device, batch=opt.max_batch + 1,  # + the scratch row
                 dtype_bytes=torch.finfo(loaded.dtype).bits // 8, prefix_bytes=prefix,
                 shrink=KV_SHRINK.replace(" or", ",") + " or --prefix-cache-mb" if prefix else KV_SHRINK)
    runner = ModelRunner(loaded.model, opt.max_batch, device=loaded.device, dtype=loaded.dtype,
                         compile=opt.compile, cuda_graphs=opt.cuda_graphs, lanes_per_row=opt.spec_tokens + 1,
                         prefix_cache_bytes=prefix)
    if opt.cuda_graphs or opt.compile:
        log.info("warming up: %d step variants captured/compiled", runner.warmup())
    return Engine(runner, loaded.tokenizer, opt.max_queue if max_queue is None else max_queue,
                  prompt_nll=opt.prompt_nll, prefill_chunk=opt.prefill_chunk)

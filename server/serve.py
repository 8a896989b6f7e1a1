"""`loopgpt serve`: flags, then uvicorn with a graceful drain on SIGTERM.

On SIGTERM (or Ctrl-C) the engine stops admitting (503), running streams get `--shutdown-grace`
seconds to finish, the rest end with finish_reason "abort", and the process exits 0.

    loopgpt serve --checkpoint checkpoints/demo --port 8000
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

import torch
import uvicorn
from loopgpt.model import resolve_device
from loopgpt.model.checkpoint import load_config
from sse_starlette.sse import AppStatus

from .app import ServerOptions, create_app
from .runner import ONNX_MISSING, BackendError, load_backend
from .scale_out import add_ray_args, parse_scaling, serve_ray

log = logging.getLogger("loopgpt.server")


def add_serve_args(p: argparse.ArgumentParser, default_checkpoint: str) -> None:
    p.add_argument("--checkpoint", default=default_checkpoint,
                   help="checkpoint directory (or ONNX export directory with --backend onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--api-key", default=os.environ.get("LOOPGPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on generation routes (default: $LOOPGPT_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache rows: requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    p.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (413 above)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running streams may finish after SIGTERM before they are aborted")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled per engine step (chunked prefill): smaller keeps running streams "
                        "smooth while long prompts arrive, larger prefills faster (default 128)")
    p.add_argument("--no-prompt-nll", dest="prompt_nll", action="store_false",
                   help="skip scoring each prompt's own tokens (the prompt_nll metric)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the model (default: cores - 1, leaving one for HTTP; oversubscribed "
                        "OpenMP threads spin and can make decoding many times slower)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--replica-name", default=os.environ.get("LOOPGPT_REPLICA"),
                   help="name sent in the x-loopgpt-replica response header (default: $LOOPGPT_REPLICA)")
    add_ray_args(p)


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: on the exit signal, tell the engine to drain before uvicorn waits for connections."""

    def __init__(self, config: uvicorn.Config, state, grace_s: float):
        super().__init__(config)
        self.state, self.grace_s = state, grace_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.engine is not None and not self.should_exit:
            log.info("signal %d: draining (up to %.1fs for running streams)", sig, self.grace_s)
            self.state.engine.drain(self.grace_s)
        super().handle_exit(sig, frame)


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-body", args.max_body), ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.shutdown_grace < 0:
        raise ValueError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 1 (or 0 for cores - 1), got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.backend == "onnx" and args.onnx_loader is None:
        raise BackendError(ONNX_MISSING)
    if args.backend == "torch":
        resolve_device(args.device)
        load_config(args.checkpoint)  # a bad directory fails now, in one sentence, before binding
    parse_scaling(args)


def cmd_serve(args: argparse.Namespace) -> int:
    check_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray:
        return serve_ray(args)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    log.info("model threads: %d", torch.get_num_threads())
    options = ServerOptions(max_batch=args.max_batch, max_queue=args.max_queue, max_body=args.max_body,
                            api_key=args.api_key or None, prompt_nll=args.prompt_nll,
                            prefill_chunk=args.prefill_chunk, replica=args.replica_name or None)
    app = create_app(lambda: load_backend(args.checkpoint, args.backend, args.device, args.onnx_loader), options)
    state = app.state.loopgpt
    # Our engine decides when streams end on shutdown; sse-starlette would otherwise cut them at once.
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_grace + 5)
    server = DrainingServer(config, state, args.shutdown_grace)
    state.on_fatal = lambda _msg: setattr(server, "should_exit", True)
    # uvicorn re-raises the caught signal once it has shut down; a no-op handler makes that exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if state.load_error:
        raise BackendError(state.load_error)
    return 0

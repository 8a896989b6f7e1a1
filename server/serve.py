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

from .app import create_app
from .options import ServerOptions, add_option_flags, options_from_args
from .runner import ONNX_MISSING, BackendError, load_backend
from .scale_out import add_ray_args, parse_scaling, serve_ray

log = logging.getLogger("loopgpt.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_option_flags(p)
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


def check_args(args: argparse.Namespace) -> ServerOptions:
    """The options, validated; a bad value or checkpoint directory fails now, in one sentence, before binding."""
    options = options_from_args(args)
    if options.backend == "onnx" and args.onnx_loader is None:
        raise BackendError(ONNX_MISSING)
    if options.cuda_graphs and (options.backend != "torch" or resolve_device(options.device) == "cpu"):
        raise BackendError("--cuda-graphs needs the torch backend on a CUDA device (--device cuda)")
    if options.backend == "torch":
        resolve_device(options.device)
        load_config(options.checkpoint)
    parse_scaling(args)
    return options


def cmd_serve(args: argparse.Namespace) -> int:
    o = check_args(args)
    logging.basicConfig(level=o.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray:
        return serve_ray(args)
    torch.set_num_threads(o.threads or max(1, (os.cpu_count() or 2) - 1))
    log.info("model threads: %d", torch.get_num_threads())
    app = create_app(lambda: load_backend(o.checkpoint, o.backend, o.device, o.dtype, onnx_loader=args.onnx_loader), o)
    state = app.state.loopgpt
    # Our engine decides when streams end on shutdown; sse-starlette would otherwise cut them at once.
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(app, host=o.host, port=o.port, log_level=o.log_level,
                            timeout_graceful_shutdown=o.shutdown_grace + 5)
    server = DrainingServer(config, state, o.shutdown_grace)
    state.on_fatal = lambda _msg: setattr(server, "should_exit", True)
    # uvicorn re-raises the caught signal once it has shut down; a no-op handler makes that exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if state.load_error:
        raise BackendError(state.load_error)
    return 0

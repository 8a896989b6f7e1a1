"""`loopgpt serve`: flags, the port bound before the model loads, then uvicorn with a graceful drain on SIGTERM.

The engine runs in its own process (server/engine/process.py) unless `--engine thread`.
On SIGTERM (or Ctrl-C) the engine stops admitting and the port stays open while requests are running: /health
answers 503 `draining` and a new generation request 503 `not_ready`, so a load balancer's probe sees the drain.
Running streams get `--shutdown-grace` seconds to finish, the rest end with finish_reason "abort"; then the port
closes and the process exits 0 (at once, when nothing was running). A second signal skips the wait.

    loopgpt serve --checkpoint checkpoints/demo --port 8000
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

import torch
import uvicorn
from loopgpt.model import resolve_device
from loopgpt.model.checkpoint import load_config
from sse_starlette.sse import AppStatus

from .app import create_app
from .engine import ONNX_MISSING, BackendError, load_backend
from .engine.process import spawn_engine
from .options import ServerOptions, add_option_flags, options_from_args
from .protocol import listen_socket, uvicorn_config
from .scale_out import add_ray_args, parse_scaling, serve_ray

log = logging.getLogger("loopgpt.server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_option_flags(p)
    add_ray_args(p)


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the exit signal drains the engine first, with the port open; uvicorn's own shutdown (which
    closes the port at once) starts when nothing is running any more, or at a second signal."""

    def __init__(self, config: uvicorn.Config, state, grace_s: float):
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self.draining = False

    def handle_exit(self, sig: int, frame) -> None:
        engine = self.state.engine
        if engine is None or self.draining or self.should_exit:  # loading, or a second signal: stop now
            super().handle_exit(sig, frame)
            return
        log.info("signal %d: draining (up to %.1fs for running streams)", sig, self.grace_s)
        self.draining = True
        engine.drain(self.grace_s)
        threading.Thread(target=self._exit_when_drained, args=(sig,), name="loopgpt-drain", daemon=True).start()

    def _exit_when_drained(self, sig: int) -> None:
        # After the deadline the engine aborts what still runs; the margin covers its last step on a busy CPU.
        deadline = time.monotonic() + self.grace_s + 5
        while self.state.engine.counts() != (0, 0) and time.monotonic() < deadline and not self.should_exit:
            time.sleep(0.05)
        super().handle_exit(sig, None)


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
    sock = listen_socket(o.host, o.port)  # a taken port is one sentence now, before minutes of loading
    threads = o.threads or max(1, (os.cpu_count() or 2) - 1)  # the model's; one core is left for HTTP
    if o.engine == "process":
        torch.set_num_threads(1)  # this process only tokenizes and streams
        app = create_app(lambda: spawn_engine(o, args.onnx_loader, threads), o)
    else:
        torch.set_num_threads(threads)
        log.info("model threads: %d", threads)
        app = create_app(lambda: load_backend(o.checkpoint, o.backend, o.device, o.dtype, args.onnx_loader), o)
    state = app.state.loopgpt
    # Our engine decides when streams end on shutdown; sse-starlette would otherwise cut them at once.
    AppStatus.disable_automatic_graceful_drain()
    config = uvicorn_config(app, o.header_timeout, host=o.host, port=o.port, log_level=o.log_level,
                            timeout_graceful_shutdown=o.shutdown_grace + 5)
    server = DrainingServer(config, state, o.shutdown_grace)
    state.on_fatal = lambda _msg: setattr(server, "should_exit", True)
    # uvicorn re-raises the caught signal once it has shut down; a no-op handler makes that exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    if state.load_error:
        raise BackendError(state.load_error)
    return 0

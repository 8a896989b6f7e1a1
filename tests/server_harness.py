"""Helpers for the server tests, defined once: a real uvicorn server on a free 127.0.0.1 port (in a thread, or
`loopgpt serve` as a child process), an engine event collector, SSE parsing, a checkpoint with a long context (so
that a request can outlive the few steps a test needs).

    python -m pytest tests/test_server_http.py -q
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch
import uvicorn
from conftest import tiny_model
from loopgpt.model import save_checkpoint
from loopgpt.server.app import ServerOptions, create_app
from loopgpt.server.engine import FinishEvent, TokenEvent, load_backend
from loopgpt.server.protocol import listen_socket, uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 60, proc: subprocess.Popen | None = None, interval_s: float = 0.1,
                 exited: Callable[[], str] = lambda: "the server exited", each: Callable[[], None] | None = None,
                 ) -> None:
    """Poll GET /health until it answers 200; fails if `proc` exits first (with `exited()` as the message) or the
    deadline passes. `each` runs at every poll (e.g. to record child processes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc is None or proc.poll() is None, exited()
        if each is not None:
            each()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} was not healthy within {timeout_s} s"
        time.sleep(interval_s)


@contextlib.contextmanager
def running_server(checkpoint: Path, header_timeout: float = 10.0, **options) -> Iterator[tuple[str, object]]:
    """(base URL, app) of a uvicorn server in a thread, on `loopgpt serve`'s own socket and protocol
    (server/protocol.py), ready (/health 200) before it is yielded."""
    app = create_app(lambda: load_backend(checkpoint, "torch", "cpu", "float32"), ServerOptions(**options))
    sock = listen_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, header_timeout, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_healthy(url, interval_s=0.05)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def serve_process(log_path: Path, *flags: str, timeout_s: float = 60, clean_exit: bool = True,
                  ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`loopgpt serve FLAGS` as a child process on a free 127.0.0.1 port, its output in `log_path`; yields (base URL,
    process) once /health answers 200 (failing with the log if it exits first). On the way out it is terminated
    and, with `clean_exit`, must exit 0 (the SIGTERM drain)."""
    port = free_port()
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "loopgpt.cli", "serve", "--host", "127.0.0.1", "--port",
                                 str(port), *flags], stdout=log, stderr=subprocess.STDOUT)

        def exited() -> str:
            log.seek(0)
            return f"loopgpt serve exited with {proc.returncode}:\n{log.read()[-5000:]}"

        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, timeout_s, proc, interval_s=0.2, exited=exited)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        assert not clean_exit or proc.returncode == 0, exited()  # not reached when the test itself failed


class Collector:
    """An engine `emit` callback that keeps one request's events (thread-safe: the engine thread appends, the test
    reads after `done`). `order`, when given, gets `name` appended as the request finishes."""

    def __init__(self, order: list | None = None, name: str = ""):
        self.events: list = []
        self.done = threading.Event()
        self.order, self.name = order, name

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if isinstance(ev, FinishEvent):
            if self.order is not None:
                self.order.append(self.name)
            self.done.set()

    def finish(self, timeout_s: float = 60) -> FinishEvent:
        assert self.done.wait(timeout_s), f"request did not finish within {timeout_s} s"
        return self.events[-1]

    def tokens(self) -> list[int]:
        """The generated token ids, once the request has finished."""
        self.finish()
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]


def make_long_checkpoint(directory: Path, bpe) -> Path:
    """The tiny model with a 1024-token context: a 900-token request runs for seconds on CPU."""
    model = tiny_model(vocab_size=bpe.n_vocab, eot_token=bpe.eot_token, block_size=1024)
    with torch.no_grad():  # EOS logit exactly 0: a greedy request never stops early, it runs to the drain
        model.transformer.wte.weight[bpe.eot_token].zero_()
    save_checkpoint(model, directory, bpe)
    return directory


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """Parsed `data:` payloads of an SSE stream; "[DONE]" comes through as the string."""
    for line in lines:
        if line.startswith("data:"):
            payload = line[5:].strip()
            yield payload if payload == "[DONE]" else json.loads(payload)


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kw)


def samples(url: str) -> dict[str, list]:
    """name -> [(labels, value)] from /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def metric_value(url: str, name: str, **labels) -> float:
    """One sample of /metrics; 0 if absent."""
    return next((v for got, v in samples(url).get(name, []) if all(got.get(k) == x for k, x in labels.items())), 0.0)

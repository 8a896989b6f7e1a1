"""The engine in its own process (`loopgpt serve`'s default, `--engine process`): vLLM V1's EngineCore, in our words.

The engine process owns the model, the KV cache and the scheduler, and steps the batch as the engine thread would
(`Engine.step`). The API process keeps HTTP, validation, tokenization, SSE and Prometheus, and talks to it over ZMQ
(two PUSH/PULL pipes on ipc:// sockets) with msgspec's msgpack (wire.py): requests and aborts go in, and ONE message
per engine step comes out with every event of the step, which the API side fans out to its streams. So the model's
threads never wait for the API's GIL, and the API's work (JSON, SSE, HTTP) runs on the cores the model leaves.

Detokenization and stop strings stay in the engine: they decide when a row's KV-cache slot frees, and cost about 2%
of the engine's time (`loopgpt_engine_seconds_total{phase="postprocess"}`), less than the extra abort round trip and
the wasted decode steps that moving them would cost.

`EngineClient` has the thread engine's interface (`submit_all`, `abort`, `drain`, `stop`, `counts`, `alive`). If the
engine process dies, every running request ends with an error, new ones get a 503 and `/health` fails.

    python -m pytest tests/test_engine_process.py -q
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from typing import Any

import torch
import zmq
from loopgpt.model import LoopGPTConfig
from loopgpt.model.tokenizer import load_tokenizer

from .core import NotAccepting, QueueFull
from .loading import Loaded, build_engine, load_backend
from .request import FinishEvent, Request
from .wire import decode, encode, pack_arg, pack_event, pack_request, unpack_arg, unpack_event, unpack_request

log = logging.getLogger("loopgpt.server")
POLL_MS = 100  # how often an idle engine, and the API's receiver, look at the other side's health


@dataclasses.dataclass
class Described:
    """The model as the API process knows it: its serving config (the weights live in the engine process)."""

    config: LoopGPTConfig


class Outbox:
    """The engine process's side of one step's message: its events and its metric calls, sent together."""

    def __init__(self, requests: dict[int, Request]):
        self.events: list[list] = []
        self.calls: list[list] = []
        self.requests = requests  # rid -> request, until it finishes (aborts find their request here)

    def emitter(self, rid: int):
        def emit(event: Any) -> None:
            self.events.append([rid, pack_event(event)])
            if isinstance(event, FinishEvent):
                self.requests.pop(rid, None)
        return emit

    def __getattr__(self, method: str):  # the engine's `metrics`: every ServerMetrics call is recorded
        return lambda *args: self.calls.append([method, [pack_arg(a) for a in args]])

    def take(self) -> tuple[list, list]:
        events, calls, self.events, self.calls = self.events, self.calls, [], []
        return events, calls


def engine_main(options: Any, onnx_loader: Any, inbox: str, outbox: str, threads: int) -> None:
    """The engine process: load, say ready, then read requests and step until told to stop (or orphaned)."""
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM reach the API process, which drains us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    parent = os.getppid()
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(inbox)
    push.connect(outbox)
    try:
        loaded = load_backend(options.checkpoint, options.backend, options.device, options.dtype, onnx_loader)
        engine = build_engine(loaded, options, max_queue=1 << 30)  # the API side enforces --max-queue
    except Exception as e:  # noqa: BLE001  (every failure is reported to the API process, which exits with it)
        first = (str(e).strip().splitlines() or [""])[0]
        push.send(encode(["error", first, isinstance(e, ValueError | OSError), type(e).__name__]))
        return
    requests: dict[int, Request] = {}
    out = Outbox(requests)
    engine.metrics, engine.accepting = out, True
    cfg = loaded.model.config
    push.send(encode(["ready", {"config": cfg.to_dict(), "name": loaded.name, "device": loaded.device,
                                "dtype": str(loaded.dtype).removeprefix("torch."), "evals": loaded.evals,
                                "chat_template": loaded.chat_template, "threads": torch.get_num_threads()}]))
    received = 0
    with engine.runner.context():
        while True:
            stop = os.getppid() != parent  # the API process is gone: nobody to serve
            news = busy = engine.busy()  # a busy engine only glances at its inbox; an idle one waits on it
            while not stop and pull.poll(0 if news else POLL_MS):
                msg, news = decode(pull.recv()), True
                if msg[0] == "add":
                    received += 1
                    reqs = [unpack_request(m, out.emitter) for m in msg[1]]
                    for r in reqs:
                        requests.update((x.rid, x) for x in (r, *r.siblings))
                    try:
                        engine.submit_all(reqs)
                    except NotAccepting:  # arrived after the drain began
                        for r in reqs:
                            engine._finish_unadmitted(r)
                elif msg[0] == "abort":
                    if msg[1] in requests:
                        engine.abort(requests[msg[1]])
                elif msg[0] == "drain":
                    engine.drain(msg[1])
                else:  # stop
                    stop = True
            if stop:
                break
            if busy or engine.busy():
                engine.step()
            events, calls = out.take()
            if news or events or calls:  # one message per step (and one per batch of news read while idle)
                running, waiting = engine.counts()
                push.send(encode(["step", {"events": events, "calls": calls, "running": running, "waiting": waiting,
                                           "received": received, "cpu": time.process_time()}]))
        engine.shutdown()
    events, calls = out.take()
    push.send(encode(["step", {"events": events, "calls": calls, "running": 0, "waiting": 0, "received": received,
                               "cpu": time.process_time()}]))
    push.send(encode(["bye"]))
    push.close(linger=1000)


class EngineClient:
    """The API process's handle on the engine process, with the engine's interface."""

    def __init__(self, options: Any, onnx_loader: Any = None, threads: int = 1):
        self.max_queue = options.max_queue
        self.metrics: Any = None  # set by ServerState.start; the engine's metric calls are replayed on it
        self.drain_deadline: float | None = None
        self.dead: str | None = None  # why the engine process is gone, once it is
        self.requests: dict[int, Request] = {}  # rid -> live request (each choice of a group its own)
        self.next_rid, self.sent, self.received = 1, 0, 0
        self.running = self.waiting = 0
        self.cpu = 0.0
        self.lock = threading.Lock()  # the PUSH socket and the counters, from the event loop and signal handlers
        self.dir = tempfile.TemporaryDirectory(prefix="loopgpt-engine-")
        self.ctx = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        inbox, outbox = f"ipc://{self.dir.name}/in", f"ipc://{self.dir.name}/out"
        self.push.bind(inbox)
        self.pull.bind(outbox)
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied threads, locks or CUDA state
        self.proc = spawn.Process(target=engine_main, args=(options, onnx_loader, inbox, outbox, threads),
                                  name="loopgpt-engine", daemon=True)
        self.proc.start()
        self.thread: threading.Thread | None = None

    def wait_ready(self) -> dict:
        """The engine's description once it has loaded; a load failure raises with the engine's own sentence."""
        while not self.pull.poll(POLL_MS):
            if not self.proc.is_alive():
                raise RuntimeError(f"the engine process exited with code {self.proc.exitcode} while loading")
        msg = decode(self.pull.recv())
        if msg[0] == "error":
            _, sentence, expected, kind = msg
            self.close()
            raise (ValueError(sentence) if expected else RuntimeError(f"{kind}: {sentence}"))
        return msg[1]

    def start(self) -> None:
        self.thread = threading.Thread(target=self._receive, name="loopgpt-engine-client", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.dead is None and self.proc.is_alive()

    # ---- the engine's interface ----

    def submit_all(self, reqs: list[Request]) -> None:
        with self.lock:
            if self.dead is not None:
                raise NotAccepting(f"the engine process has stopped ({self.dead}); the server must be restarted")
            if self.drain_deadline is not None:
                raise NotAccepting("the server is not accepting requests (shutting down); retry shortly")
            if self.waiting + (self.sent - self.received) + len(reqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            for req in reqs:
                for r in (req, *req.siblings):
                    r.rid, self.next_rid = self.next_rid, self.next_rid + 1
                    self.requests[r.rid] = r
            self.push.send(encode(["add", [pack_request(r) for r in reqs]]))
            self.sent += 1

    def abort(self, req: Request) -> None:
        req.aborted = True
        self._send(["abort", req.rid])

    def drain(self, grace_s: float) -> None:
        self.drain_deadline = time.perf_counter() + grace_s
        self._send(["drain", grace_s])

    def counts(self) -> tuple[int, int]:
        """(running, waiting), as the engine last reported them, plus what it has not read yet."""
        return self.running, self.waiting + (self.sent - self.received)

    def stop(self, timeout: float = 10.0) -> None:
        self._send(["stop"])
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
        if self.thread is not None:
            self.thread.join(timeout)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.push.close(linger=0)
        if self.thread is None:  # the receiver owns the PULL socket once started
            self.pull.close(linger=0)
        self.dir.cleanup()  # (again after a failed start: a no-op)

    def _send(self, msg: list) -> None:
        with self.lock, contextlib.suppress(zmq.ZMQError):
            if self.dead is None:
                self.push.send(encode(msg))

    # ---- the receiver thread: one message per engine step, fanned out ----

    def _receive(self) -> None:
        while True:
            try:
                ready = self.pull.poll(POLL_MS)
            except zmq.ZMQError:
                return
            if not ready:
                if not self.proc.is_alive():
                    self._died(f"exit code {self.proc.exitcode}")
                    break
                continue
            msg = decode(self.pull.recv())
            if msg[0] == "bye":
                break
            self._deliver(msg[1])
        self.pull.close(linger=0)

    def _deliver(self, step: dict) -> None:
        for method, packed in step["calls"]:  # before the events: a finish event retires its request
            if self.metrics is None or any(kind == "req" and rid not in self.requests for kind, rid in packed):
                continue  # (a request the client no longer knows: its engine died under it)
            getattr(self.metrics, method)(*(unpack_arg(a, self.requests) for a in packed))
        if self.metrics is not None and step["cpu"] > self.cpu:
            self.metrics.engine_cpu_time(step["cpu"] - self.cpu)
        self.cpu = step["cpu"]
        with self.lock:
            self.running, self.waiting, self.received = step["running"], step["waiting"], step["received"]
        for rid, packed in step["events"]:
            req = self.requests.get(rid)
            if req is None:
                continue
            event = unpack_event(packed)
            if isinstance(event, FinishEvent):
                req.done = True
                del self.requests[rid]
            self._emit(req, event)

    def _died(self, why: str) -> None:
        log.error("the engine process has stopped (%s): ending every request; /health now fails", why)
        with self.lock:
            self.dead = why
            live, self.requests = list(self.requests.values()), {}
        now = time.perf_counter()
        for req in live:
            req.done = True
            self._emit(req, FinishEvent("error", "", len(req.prompt_ids), 0, None, now - req.arrival, None, None,
                                        error="the engine process stopped while serving this request; retry"))

    @staticmethod
    def _emit(req: Request, event: Any) -> None:
        try:
            req.emit(event)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening any more
            req.aborted = True


def spawn_engine(options: Any, onnx_loader: Any = None, threads: int = 1) -> Loaded:
    """Start the engine process and wait until it has loaded the model: what the API process needs of it."""
    client = EngineClient(options, onnx_loader, threads)
    try:
        info = client.wait_ready()
        config = LoopGPTConfig.from_dict(info["config"])
        tokenizer = load_tokenizer(config.tokenizer, options.checkpoint)
    except BaseException:
        client.stop(timeout=5)  # no engine process (and no open socket) outlives a failed start
        raise
    log.info("engine process %d: %d model threads", client.proc.pid, info["threads"])
    return Loaded(Described(config), tokenizer, info["evals"], info["name"], info["device"],
                  getattr(torch, info["dtype"]), info["chat_template"], engine=client)

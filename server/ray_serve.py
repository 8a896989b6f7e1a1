"""Ray Serve replicas of the loopgpt server: each replica is the same FastAPI app (`create_app`) with its
own engine, behind Ray's HTTP proxy, so routes, streaming, errors, the API key and metrics are unchanged.

Each replica loads the checkpoint before Ray routes to it (its lifespan start-up waits for the engine),
names itself in `x-loopgpt-replica`, and publishes its own Prometheus endpoint (every series with a
`replica` label) as a file_sd target in `--metrics-sd-dir`. On scale-down or shutdown Ray stops routing to
the replica and waits `graceful_shutdown_timeout_s` (= `--shutdown-grace`) for its streams to finish;
whatever still runs then ends with finish_reason "abort".

    loopgpt serve --ray --replicas 2 --threads 1           # starts a local Ray cluster
    serve run deploy/ray/loopgpt.yaml                      # the same application from Ray's own config file
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import ray
import torch
from loopgpt.model import resolve_device
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from ray import serve

from .app import create_app
from .engine import load_backend
from .options import ServerOptions, options_from_args
from .scaling import ScaleOutError, Scaling

log = logging.getLogger("loopgpt.server")
APP_NAME = "loopgpt"
DEPLOYMENT = "loopgpt"
LOAD_TIMEOUT_S = 600.0  # a replica that cannot load its model in this time fails its start-up
HEARTBEAT_S, STALE_S = 5.0, 20.0  # metrics target files: rewritten this often, pruned when this old


@dataclass
class ReplicaSettings:
    """What every replica needs to build its server; plain data, so Ray can ship it to any node."""

    checkpoint: str
    backend: str = "torch"
    device: str = "auto"
    threads: int = 1
    server: dict = field(default_factory=dict)  # ServerOptions fields
    metrics_port: int = 0
    metrics_sd_dir: str | None = None
    onnx_loader: Any = None  # loopgpt.cli.load_onnx for --backend onnx (server/ does not import export/)


class ReplicaLabel:
    """A collector that re-exposes a registry with a `replica` label on every sample."""

    def __init__(self, registry: CollectorRegistry, replica: str):
        self.registry, self.replica = registry, replica

    def collect(self):
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, "replica": self.replica}, s.value, s.timestamp, s.exemplar)
            yield out


class MetricsEndpoint:
    """One replica's /metrics on its own port, announced to Prometheus as a file_sd target file.

    The file is rewritten every HEARTBEAT_S; files nobody rewrote for STALE_S belong to replicas that died
    without cleaning up (killed, node lost) and are removed by whichever replica sees them, so Prometheus
    stops scraping a target that will never answer again."""

    def __init__(self, registry: CollectorRegistry, replica: str, host: str, port: int, sd_dir: str | None):
        exposed = CollectorRegistry(auto_describe=False)
        exposed.register(ReplicaLabel(registry, replica))
        self.server, self.thread = start_http_server(port, addr=host, registry=exposed)
        self.target = f"{host}:{self.server.server_port}"
        self.sd_file = Path(sd_dir) / f"{replica}.json" if sd_dir else None
        self.stopped = threading.Event()
        if self.sd_file is not None:
            self.sd_file.parent.mkdir(parents=True, exist_ok=True)
            self._announce()
            threading.Thread(target=self._heartbeat, name="loopgpt-metrics-sd", daemon=True).start()

    def _announce(self) -> None:
        tmp = self.sd_file.with_suffix(".tmp")  # renamed into place: Prometheus never reads half a file
        tmp.write_text(json.dumps([{"targets": [self.target], "labels": {"deployment": DEPLOYMENT}}]))
        tmp.replace(self.sd_file)

    def _heartbeat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_S):
            self._announce()
            for other in self.sd_file.parent.glob("*.json"):
                try:
                    if time.time() - other.stat().st_mtime > STALE_S:
                        other.unlink()
                except FileNotFoundError:
                    pass  # another replica pruned it first

    def close(self) -> None:
        self.stopped.set()
        if self.sd_file is not None:
            self.sd_file.unlink(missing_ok=True)
        self.server.shutdown()
        self.server.server_close()


class ReadyGate:
    """The replica's ASGI app: `create_app`'s app, whose lifespan start-up completes only once the engine
    runs, so Ray routes no request to a replica that would answer 503 while it loads."""

    def __init__(self, app: Any, on_ready):
        self.app, self.state, self.on_ready = app, app.state.loopgpt, on_ready

    def add_exception_handler(self, *args, **kwargs) -> None:  # Ray registers its back-pressure errors here
        self.app.add_exception_handler(*args, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_when_loaded(message) -> None:
            if message["type"] == "lifespan.startup.complete":
                deadline = time.monotonic() + LOAD_TIMEOUT_S
                while self.state.engine is None and self.state.load_error is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if self.state.engine is None:
                    why = self.state.load_error or f"the model did not load within {LOAD_TIMEOUT_S:.0f} s"
                    message = {"type": "lifespan.startup.failed", "message": why}
                else:
                    self.on_ready(self.state)
            await send(message)

        await self.app(scope, receive, send_when_loaded)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class LoopGPTReplica:
    """One engine. Ray calls `__serve_build_asgi_app__` after the constructor and runs the app's lifespan."""

    def __init__(self, settings: dict):
        self.settings = ReplicaSettings(**settings)
        # Replicas share the node's cores: each takes only its own threads (oversubscribed OpenMP spins).
        torch.set_num_threads(self.settings.threads)
        self.name = serve.get_replica_context().replica_id.unique_id
        self.metrics: MetricsEndpoint | None = None
        self.state = None

    def __serve_build_asgi_app__(self):
        s = self.settings
        options = ServerOptions(**{**s.server, "replica_name": self.name})
        app = create_app(lambda: load_backend(s.checkpoint, s.backend, s.device, options.dtype,
                                              onnx_loader=s.onnx_loader), options)
        return ReadyGate(app, self._export_metrics)

    def _export_metrics(self, state) -> None:
        self.state = state
        host = ray.util.get_node_ip_address()
        self.metrics = MetricsEndpoint(state.metrics.registry, self.name, host, self.settings.metrics_port,
                                       self.settings.metrics_sd_dir)
        log.info("replica %s ready: metrics on http://%s/metrics", self.name, self.metrics.target)

    def identity(self) -> dict:
        """Who this replica is: its name (the x-loopgpt-replica header), process id and metrics target."""
        return {"replica": self.name, "pid": os.getpid(), "metrics": self.metrics.target if self.metrics else None}

    def check_health(self) -> None:
        """Ray's periodic probe: a replica whose engine thread died is replaced."""
        engine = self.state.engine if self.state is not None else None
        if engine is not None and not engine.alive():
            raise RuntimeError(f"replica {self.name}: the engine thread is not running")

    def __del__(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def application(settings: ReplicaSettings, scaling: Scaling, grace_s: float, gpus: float = 0.0) -> serve.Application:
    """The replicas as a Ray Serve application, ready for `serve.run`."""
    return LoopGPTReplica.options(**deployment_options(settings, scaling, grace_s, gpus)).bind(asdict(settings))


def deployment_options(settings: ReplicaSettings, scaling: Scaling, grace_s: float, gpus: float) -> dict:
    """Ray Serve deployment options for these replicas."""
    server = ServerOptions(**settings.server)
    return {
        **scaling.ray_options(server.max_batch),
        # A replica takes its batch plus its own queue; past that Ray's router holds requests for another.
        "max_ongoing_requests": server.max_batch + server.max_queue,
        "graceful_shutdown_timeout_s": grace_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5.0,
        "ray_actor_options": {"num_cpus": settings.threads, "num_gpus": gpus},
    }


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / a Ray Serve config file (`import_path: loopgpt.server.ray_serve:build_app`).

    `args` are ReplicaSettings fields; `checkpoint` is resolved here, against the directory `serve run` runs in.
    Replica count, autoscaling and resources come from the config file's `deployments:` section."""
    args = dict(args)
    unknown = sorted(set(args) - ({f.name for f in fields(ReplicaSettings)} - {"onnx_loader"}))
    if unknown or "checkpoint" not in args:
        raise ValueError(f"the Ray Serve config's args take checkpoint (required), backend, device, threads, server, "
                         f"metrics_port, metrics_sd_dir; got {', '.join(unknown) or 'no checkpoint'}")
    args["checkpoint"] = str(Path(args["checkpoint"]).resolve())
    server = {"api_key": os.environ.get("LOOPGPT_API_KEY") or None, **args.get("server", {})}
    try:
        ServerOptions(**server)
    except TypeError as e:
        raise ValueError(f"the Ray Serve config's args.server takes ServerOptions fields: {e}") from None
    return LoopGPTReplica.bind(asdict(ReplicaSettings(**{**args, "server": server})))


def settings_from_args(args: argparse.Namespace, threads: int) -> ReplicaSettings:
    server = asdict(options_from_args(args))
    return ReplicaSettings(checkpoint=str(Path(args.checkpoint).resolve()), backend=args.backend, device=args.device,
                           threads=threads, server=server, metrics_port=args.metrics_port,
                           metrics_sd_dir=args.metrics_sd_dir, onnx_loader=args.onnx_loader)


def run_cluster(args: argparse.Namespace, scaling: Scaling) -> int:
    """`loopgpt serve --ray`: start (or join) Ray, deploy the replicas, serve until SIGTERM or Ctrl-C."""
    # Each replica gets --threads threads (default 1): replicas, not threads, are what scale out here.
    threads = args.threads or 1
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if resolve_device(args.device) == "cuda" else 0.0
    settings = settings_from_args(args, threads)
    app = application(settings, scaling, args.shutdown_grace, gpus)
    try:
        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError:  # 'auto' with no cluster on this node
        raise ScaleOutError(f"no Ray cluster to join at {args.ray_address!r}: start one with `ray start --head`, or "
                            "leave out --ray-address to start a local one") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        what = f"autoscaling {scaling.autoscale[0]}..{scaling.autoscale[1]}" if scaling.autoscale else (
            f"{scaling.replicas} replica(s)")
        log.info("serving %s on http://%s:%d through Ray Serve (%s, %d thread(s) each); replica metrics targets "
                 "in %s", args.checkpoint, args.host, args.port, what, threads, args.metrics_sd_dir)
        stop.wait()
        log.info("stopping: replicas drain for up to %.1f s", args.shutdown_grace)
    finally:
        # Graceful: each replica waits for its streams, as on scale-down. A cluster we only joined keeps its Serve.
        if args.ray_address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0


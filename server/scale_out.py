"""`loopgpt serve --ray`: the flag group that scales one server out to Ray Serve replicas, checked here
and handed to `ray_serve.py` (which needs the optional `ray` extra, so it is imported only when asked for).

    loopgpt serve --ray --replicas 2 --threads 1            # two engines behind Ray's HTTP proxy on :8000
    loopgpt serve --ray --autoscale 1:4 --target-ongoing 8  # Ray adds replicas while each has > 8 requests
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

RAY_MISSING = "--ray needs Ray Serve, which is not installed: pip install 'loopgpt[ray]'"


class ScaleOutError(ValueError):
    """A --ray flag combination that cannot run; the message says what to change."""


@dataclass(frozen=True)
class Scaling:
    """How many replicas: a fixed count, or Ray's autoscaler between two bounds."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max)
    target_ongoing: int | None = None  # requests per replica the autoscaler aims at

    def ray_options(self, max_batch: int) -> dict:
        """The deployment's replica-count options in Ray Serve's own vocabulary."""
        if self.autoscale is None:
            return {"num_replicas": self.replicas}
        low, high = self.autoscale
        # A full batch per replica is the natural target: past it, requests queue inside the engine.
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                       "target_ongoing_requests": self.target_ongoing or max_batch}}

    @property
    def most(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale out with Ray Serve (pip install 'loopgpt[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: several replicas, each its own engine with --threads torch threads "
                        "(default 1 under --ray), behind Ray's HTTP proxy on --host/--port")
    g.add_argument("--replicas", type=int, default=None, help="with --ray: a fixed number of replicas (default 1)")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="with --ray: let Ray's autoscaler keep between MIN and MAX replicas (MIN may be 0)")
    g.add_argument("--target-ongoing", type=int, default=None,
                   help="with --autoscale: requests per replica that Ray scales towards (default --max-batch)")
    g.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster ('auto', or host:port) instead of starting a local one "
                        "(default: $RAY_ADDRESS)")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="with --ray: GPUs each replica reserves (default 1 when serving on CUDA, else 0)")
    g.add_argument("--metrics-port", type=int, default=0,
                   help="with --ray: port of each replica's own /metrics endpoint (default 0: any free port, "
                        "published for Prometheus in --metrics-sd-dir)")
    g.add_argument("--metrics-sd-dir", default=os.environ.get("LOOPGPT_METRICS_SD_DIR", "/tmp/loopgpt-prometheus-sd"),
                   help="with --ray: where each replica writes its Prometheus file_sd target "
                        "(default /tmp/loopgpt-prometheus-sd)")


def parse_scaling(args: argparse.Namespace) -> Scaling:
    """The Scaling the flags ask for; one sentence naming the flag when they do not make sense."""
    given = [f for f, v in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                            ("--target-ongoing", args.target_ongoing)) if v is not None]
    if not args.ray:
        if given:
            raise ScaleOutError(f"{given[0]} needs --ray (one `loopgpt serve` process is one replica)")
        return Scaling()
    if args.replicas is not None and args.autoscale is not None:
        raise ScaleOutError("give --replicas N or --autoscale MIN:MAX, not both")
    if args.target_ongoing is not None and args.autoscale is None:
        raise ScaleOutError("--target-ongoing needs --autoscale MIN:MAX (it is the autoscaler's target)")
    if args.target_ongoing is not None and args.target_ongoing < 1:
        raise ScaleOutError(f"--target-ongoing must be >= 1, got {args.target_ongoing}")
    if args.gpus_per_replica is not None and args.gpus_per_replica < 0:
        raise ScaleOutError(f"--gpus-per-replica must be >= 0, got {args.gpus_per_replica}")
    if args.autoscale is None:
        replicas = 1 if args.replicas is None else args.replicas
        if replicas < 1:
            raise ScaleOutError(f"--replicas must be >= 1, got {replicas}")
        return Scaling(replicas=replicas)
    low, sep, high = args.autoscale.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise ScaleOutError(f"--autoscale takes MIN:MAX replica counts such as 1:4, got {args.autoscale!r}")
    low_n, high_n = int(low), int(high)
    if high_n < 1 or low_n > high_n:
        raise ScaleOutError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {args.autoscale!r}")
    return Scaling(autoscale=(low_n, high_n), target_ongoing=args.target_ongoing)


def preflight(args: argparse.Namespace) -> None:
    """What Ray would otherwise report as a traceback from its proxy actor, or as a minute of retries."""
    if args.ray_address is None:  # a local cluster: its proxy binds --host:--port here
        from .protocol import listen_socket

        listen_socket(args.host, args.port).close()
    elif args.ray_address != "auto":
        host, _, port = args.ray_address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ScaleOutError(f"cannot reach the Ray cluster at {args.ray_address} ({e}); give its head node's "
                                "host:port (from `ray start --head`), or 'auto' on one of its nodes") from None


def serve_ray(args: argparse.Namespace) -> int:
    """Hand `loopgpt serve --ray` to the Ray Serve module; without Ray, one sentence naming the extra."""
    scaling = parse_scaling(args)
    preflight(args)
    if args.ray_address is None and args.host in ("127.0.0.1", "localhost"):
        # A local cluster for a loopback server stays on loopback. Ray otherwise binds its node services to the
        # machine's outward address; this switch (read when ray is imported) is what it uses on macOS/Windows.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from .ray_serve import run_cluster
    except ImportError as e:
        raise ScaleOutError(f"{RAY_MISSING} ({e.name or e} is missing)") from None
    return run_cluster(args, scaling)

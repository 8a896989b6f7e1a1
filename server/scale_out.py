"""`loopgpt serve --ray`: the flag group that scales one server out to Ray Serve replicas (RayOptions, in
options.py), checked here and handed to `ray_serve.py` (which needs the optional `ray` extra, so it is imported
only when asked for; it imports scaling.py, never this module).

    loopgpt serve --ray --replicas 2 --threads 1            # two engines behind Ray's HTTP proxy on :8000
    loopgpt serve --ray --autoscale 1:4 --target-ongoing 8  # Ray adds replicas while each has > 8 requests
"""

from __future__ import annotations

import argparse
import os
import socket

from loopgpt import install_hint

from .options import RayOptions, add_option_flags, options_from_args
from .scaling import ScaleOutError, Scaling

RAY_MISSING = f"--ray needs Ray Serve, which is not installed: {install_hint('ray')}"


def add_ray_args(p: argparse.ArgumentParser) -> None:
    add_option_flags(p.add_argument_group(f"scale out with Ray Serve ({install_hint('ray')})"), RayOptions)


def parse_scaling(args: argparse.Namespace) -> Scaling:
    """The Scaling the flags (or their LOOPGPT_ variables) ask for; one sentence naming the flag when they do not
    make sense."""
    options_from_args(args, RayOptions)
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

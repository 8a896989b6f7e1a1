"""`loopgpt export onnx`: the command-line front of the ONNX export.

    loopgpt export onnx --checkpoint checkpoints/demo --out exports/demo
    loopgpt export onnx --checkpoint checkpoints/demo --out exports/demo --no-verify
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from loopgpt import install_hint


def add_export_parser(sub, default_checkpoint: str) -> None:
    """Register `export onnx` on the top-level subparsers of `loopgpt`."""
    p = sub.add_parser("export", help="export a checkpoint (ONNX) with a parity check")
    formats = p.add_subparsers(dest="format", required=True)
    q = formats.add_parser("onnx", help="split graphs + single-file model.onnx, manifest, parity check")
    q.add_argument("--checkpoint", default=default_checkpoint, help="checkpoint directory")
    q.add_argument("--out", required=True, help="export directory (created; files in it are overwritten)")
    q.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check onnxruntime against PyTorch (max |Δlogits| <= 1e-4); on by default")
    q.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed; install the export extra: {install_hint('export')}")
    from .onnx_export import export_onnx

    manifest = export_onnx(args.checkpoint, args.out, verify=args.verify,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    verified = manifest.get("verify")
    summary = f"max|Δlogits| {verified['max_abs_diff']:.1e}" if verified else "not verified"
    print(f"{args.out}: {', '.join(g['file'] for g in manifest['graphs'].values())} ({summary})")
    return 0

"""Benchmark row 5: the onnxruntime runner (`loopgpt.export`) vs torch eager, batch 1, cached decode.

The runner keeps its K/V in the same `KVCache` and is called exactly like `LoopGPT`, so both sides
run the very same decode loop. Without `--onnx DIR` the checkpoint is exported first (`loopgpt
export onnx`, in a subprocess, parity check off: only speed is measured here).

    loopgpt bench --checkpoint checkpoints/demo --rows 5 [--onnx exports/demo]
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
from loopgpt.model import LoopGPT

from .timing import Row, interleaved


def onnx_row(model: LoopGPT, checkpoint: str, onnx_dir: str | None, prompt: list[int], n: int, reps: int,
             decode: Callable) -> Row:
    loops = model.config.max_loops
    row = Row(5, f"decode batch 1, loops {loops}: onnxruntime vs torch", "tok/s",
              "onnxruntime CPU (split graphs, our KVCache)", "torch eager (LoopGPT + KVCache)", target=1.0)
    missing = [m for m in ("onnxruntime", "loopgpt.export.runtime") if importlib.util.find_spec(m) is None]
    if missing:
        row.skipped = f"{', '.join(missing)} not installed/available"
        return row
    with tempfile.TemporaryDirectory(prefix="loopgpt-bench-onnx-") as tmp:
        if onnx_dir is None:
            onnx_dir = tmp
            cmd = [sys.executable, "-m", "loopgpt.cli", "export", "onnx", "--checkpoint", checkpoint, "--out", tmp,
                   "--no-verify"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                row.skipped = f"export failed: {done.stderr.strip()[-300:]}"
                return row
        # imported by name: loadtest depends on model/ only, the ONNX runner is an optional contender
        runtime = importlib.import_module("loopgpt.export.runtime")
        runner, _, _ = runtime.load_onnx(onnx_dir, threads=torch.get_num_threads())
        times = interleaved([lambda: decode(runner, prompt, loops, n), lambda: decode(model, prompt, loops, n)], reps)
    row.ours, row.base = ([n / t for t in ts] for ts in times)
    row.extra["providers"] = ", ".join(runner.providers)
    return row

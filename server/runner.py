"""ModelRunner: the one place that knows about torch devices, dtypes and the engine's KV cache.

The engine talks to the model only through this class, and this class uses the model only through
`model.config` and `model(idx, loops, kv_cache=..., rows=...)`, so any runner with that call
signature (the ONNX runner of `loopgpt.export`) can stand in for a `LoopGPT`.

    python -c "from loopgpt.server.runner import load_backend; print(load_backend('checkpoints/demo'))"
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from loopgpt.model import KVCache, Tokenizer, load_checkpoint, make_generator, resolve_device


class BackendError(ValueError):
    """A backend or device that cannot be used; the message says what to do instead."""


ONNX_MISSING = "--backend onnx needs the ONNX runtime: pip install 'loopgpt[export]'"


@dataclass
class Loaded:
    """What `loopgpt serve` needs from a checkpoint, whatever the backend."""

    model: Any  # LoopGPT, or a runner with the same .config and call signature
    tokenizer: Tokenizer
    evals: dict | None
    name: str
    device: str


def load_backend(checkpoint: str | Path, backend: str = "torch", device: str = "auto",
                 onnx_loader: Callable | None = None) -> Loaded:
    """Load a checkpoint (torch) or an export directory (onnx) for serving.

    `onnx_loader` is `loopgpt.export.runtime.load_onnx`, handed in by the CLI: server/ does not import
    export/ (parts meet only through model/)."""
    name = Path(checkpoint).resolve().name
    if backend == "torch":
        dev = resolve_device(device)
        model, tokenizer, evals = load_checkpoint(checkpoint, device=dev)
        return Loaded(model, tokenizer, evals, name, dev)
    if backend == "onnx":
        if onnx_loader is None:
            raise BackendError(ONNX_MISSING)
        runner, tokenizer, evals = onnx_loader(checkpoint)
        return Loaded(runner, tokenizer, evals, name, "cpu")
    raise BackendError(f"--backend must be torch or onnx, got {backend!r}")


class ModelRunner:
    """Owns the model and one preallocated KV cache of `max_batch` rows; runs prefill and decode steps."""

    def __init__(self, model: Any, max_batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.config = model.config
        self.device = torch.device(device)
        self.cache = KVCache(self.config, max_batch, device=self.device, dtype=dtype)

    @property
    def max_batch(self) -> int:
        return self.cache.batch_size

    def context(self) -> contextlib.AbstractContextManager:
        """Entered once by the engine thread around its whole loop (inference mode is per thread)."""
        return torch.inference_mode()

    def generator(self, seed: int | None) -> torch.Generator:
        return make_generator(seed, self.device)

    def prefill(self, row: int, prompt: list[int], loops: int, prompt_nll: bool) -> tuple[torch.Tensor, float | None]:
        """Fill cache row `row` with the whole prompt; (logits of the last position (V,), mean prompt NLL or None)."""
        logits, nll_sum = self.prefill_chunk(row, prompt, 0, loops, None, prompt_nll)
        return logits, (nll_sum / (len(prompt) - 1) if prompt_nll and len(prompt) > 1 else None)

    def prefill_chunk(self, row: int, chunk: list[int], start: int, loops: int, next_token: int | None,
                      prompt_nll: bool) -> tuple[torch.Tensor, float]:
        """Append `chunk` (prompt positions start .. start+len-1) to cache row `row`, resetting the row at start 0.

        Returns the logits of the chunk's last position (V,) and, with `prompt_nll`, the summed teacher-forced
        NLL of the prompt tokens this chunk predicts: its own tokens after the first, and `next_token` (the
        first token of the next chunk) if any — so the chunks of one prompt score each prompt token once."""
        if start == 0:
            self.cache.reset([row])
        idx = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, T)
        rows = torch.tensor([row], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, loops, kv_cache=self.cache, rows=rows)  # (1, T, V)
        nll = 0.0
        if prompt_nll:
            # Real text scored at the request's depth, for free: the prefill computed these logits anyway.
            targets = chunk[1:] + ([] if next_token is None else [next_token])
            if targets:
                target_t = torch.tensor(targets, dtype=torch.long, device=self.device)
                nll = float(F.cross_entropy(logits[0, :len(targets)].float(), target_t, reduction="sum"))
        return logits[0, -1], nll

    def decode(self, rows: list[int], tokens: list[int], loops: list[int]) -> torch.Tensor:
        """One token for each of `rows` in ONE forward, each row at its own depth; logits (B, V)."""
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        row_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        loops_t = torch.tensor(loops, dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, loops_t, kv_cache=self.cache, rows=row_t)  # (B, 1, V)
        return logits[:, -1]

    def free(self, row: int) -> None:
        self.cache.reset([row])

    def usage(self) -> float:
        return self.cache.usage()

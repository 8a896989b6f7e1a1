"""Parity check: onnxruntime against PyTorch fp32 logits, for both export forms, prefill and cached decode.

Cases: loops 1, 2 and the trained maximum; batch 1 and 3; a prefill with an empty past, then a one-token
decode with that past; and per-row loops (1, 2, max in one batch) through the split runner. It runs on
every `loopgpt export onnx` unless `--no-verify`.

    python -c "from loopgpt.export.parity import verify_dir; print(verify_dir('checkpoints/demo', 'exports/demo'))"
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from loopgpt.model import KVCache, LoopGPT, load_checkpoint

from .manifest import SINGLE, ExportError
from .runtime import OnnxRunner, open_session

TOLERANCE = 1e-4  # max |Δlogits| allowed between onnxruntime and PyTorch, fp32
PROMPT_LEN = 5


def _diff(a: torch.Tensor, b) -> float:
    return float((a - torch.as_tensor(b)).abs().max())


def split_case(model: LoopGPT, runner: OnnxRunner, idx: torch.Tensor, loops: int | torch.Tensor) -> float:
    """Max |Δlogits| of the split runner over a prefill and a one-token decode, each with its own KVCache."""
    cfg = model.config
    B = idx.shape[0]
    deepest = loops if isinstance(loops, int) else int(loops.max())
    caches = [KVCache(cfg, B, max_len=idx.shape[1] + 1, loops=deepest) for _ in range(2)]
    worst = 0.0
    step = idx[:, :-1]
    for _ in range(2):
        ref, _ = model(step, loops, kv_cache=caches[0])
        got, _ = runner(step, loops, kv_cache=caches[1])
        worst = max(worst, _diff(ref, got))
        step = idx[:, -1:]
    assert torch.equal(caches[0].lengths, caches[1].lengths), "runner advanced the cache lengths differently"
    return worst


def single_case(model: LoopGPT, session, idx: torch.Tensor, loops: int) -> float:
    """Max |Δlogits| of model.onnx over a prefill (empty past) and a decode fed the prefill's present K/V."""
    cfg = model.config
    B, T = idx.shape
    S = cfg.n_layer * cfg.inner_loops
    past_k = past_v = np.zeros((loops, S, B, cfg.n_head, 0, cfg.head_dim), dtype=np.float32)
    pos = torch.arange(T)[None].expand(B, T)
    ref, _ = model(idx, loops)
    worst = 0.0
    for sl in (slice(0, T - 1), slice(T - 1, T)):
        feed = {"idx": idx[:, sl].numpy(), "pos": np.ascontiguousarray(pos[:, sl].numpy()),
                "past_k": past_k, "past_v": past_v}
        logits, k, v = session.run(None, feed)
        worst = max(worst, _diff(ref[:, sl], logits))
        past_k, past_v = np.concatenate([past_k, k], axis=4), np.concatenate([past_v, v], axis=4)
    return worst


@torch.inference_mode()
def verify_export(model: LoopGPT, export_dir: str | Path, log: Callable[[str], None] = print,
                  tolerance: float = TOLERANCE) -> dict:
    """Run every case; raise ExportError naming the worst case when one exceeds `tolerance`."""
    cfg = model.config
    export_dir = Path(export_dir)
    runner = OnnxRunner(export_dir, cfg)
    single = open_session(export_dir / SINGLE) if (export_dir / SINGLE).is_file() else None
    gen = torch.Generator().manual_seed(0)
    results: dict[str, float] = {}
    for loops in sorted({1, min(2, cfg.max_loops), cfg.max_loops}):
        for B in (1, 3):
            idx = torch.randint(0, cfg.vocab_size, (B, PROMPT_LEN + 1), generator=gen)
            results[f"split loops={loops} batch={B}"] = split_case(model, runner, idx, loops)
            if single is not None:
                results[f"single loops={loops} batch={B}"] = single_case(model, single, idx, loops)
    per_row = torch.tensor([1, min(2, cfg.max_loops), cfg.max_loops])
    idx = torch.randint(0, cfg.vocab_size, (3, PROMPT_LEN + 1), generator=gen)
    results[f"split per-row loops={per_row.tolist()}"] = split_case(model, runner, idx, per_row)
    worst = max(results, key=results.get)
    log(f"parity: {len(results)} cases, worst max|Δlogits| {results[worst]:.2e} ({worst}), tolerance {tolerance:.0e}")
    if results[worst] > tolerance:
        raise ExportError(f"onnxruntime differs from PyTorch by {results[worst]:.2e} in case '{worst}' "
                          f"(tolerance {tolerance:.0e}); the export is not usable")
    return {"tolerance": tolerance, "max_abs_diff": results[worst], "cases": results}


def verify_dir(checkpoint: str | Path, export_dir: str | Path) -> dict:
    model, _, _ = load_checkpoint(checkpoint)
    return verify_export(model, export_dir)

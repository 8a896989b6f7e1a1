"""OnnxRunner: the split ONNX graphs driven by onnxruntime, called exactly like `LoopGPT.forward`.

The runner drives the outer loop itself (embed, `loops` × loop body, head), so any loop count up to the
checkpoint's loop_cap and per-row loop counts work, and it keeps K/V in the same `loopgpt.model.KVCache`
as the PyTorch model, so `generate_tokens(runner, ...)` and the serving engine use it unchanged.

    python -c "from loopgpt.export import load_onnx; r, tok, _ = load_onnx('exports/demo'); \
print(r(__import__('torch').tensor([tok.encode('Hi')]), 3)[0].shape)"
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from loopgpt.model import KVCache, LoopGPTConfig, Tokenizer
from loopgpt.model.checkpoint import load_config, load_eval
from loopgpt.model.forward import Loops, forward
from loopgpt.model.kv_cache import CacheAccess
from loopgpt.model.tokenizer import TokenizerError, load_tokenizer

from .manifest import SPLIT, ExportError, read_manifest

log = logging.getLogger("loopgpt.export")


def pick_providers(providers: list[str] | None) -> list[str]:
    """The CUDA provider first when onnxruntime-gpu and a GPU are present, else the CPU provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise ExportError(f"onnxruntime provider(s) {', '.join(unknown)} not available; this install has "
                          f"{', '.join(available)}")
    return [p for p in providers if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]


def open_session(path: Path, threads: int | None = None, providers: list[str] | None = None):
    """An InferenceSession with an explicit CPU thread count; logs when it fell back from CUDA to CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1  # the graphs are one chain of ops; parallelism is inside the ops
    options.log_severity_level = 3  # errors only: per-session memcpy warnings are noise here
    wanted = pick_providers(providers)
    session = ort.InferenceSession(str(path), options, providers=wanted)
    got = session.get_providers()
    if wanted[0] != got[0]:
        log.warning("onnxruntime: %s could not start for %s; falling back to %s", wanted[0], path.name, got[0])
    return session


class OnnxRunner:
    """The split ONNX graphs as a `loopgpt.model.forward.LoopModel`: embed, loop_body and head run in
    onnxruntime, the forward contract (and its checks) comes from `loopgpt.model.forward`, K/V live in a
    `KVCache`; so generation, the serving engine and its continuous-depth step use it unchanged."""

    def __init__(self, export_dir: str | Path, config: LoopGPTConfig, threads: int | None = None,
                 providers: list[str] | None = None):
        export_dir = Path(export_dir)
        self.config = config
        self.embed_session, self.body_session, self.head_session = (
            open_session(export_dir / f, threads, providers) for f in SPLIT)
        self.providers = self.body_session.get_providers()
        self.slots_per_loop = config.n_layer * config.inner_loops

    def eval(self) -> OnnxRunner:
        return self

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        feed = {"idx": idx.cpu().numpy(), "pos": pos.cpu().contiguous().numpy()}
        return torch.from_numpy(self.embed_session.run(None, feed)[0])  # (B, T, C)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.head_session.run(None, {"x": x.float().contiguous().numpy()})[0])  # (B, T, V)

    def loop_body(self, x: torch.Tensor, loop: int | torch.Tensor, access: CacheAccess | None) -> torch.Tensor:
        """One outer loop. The graph takes one loop index, so rows at different loops (the engine's decode
        step) run as one session call per distinct loop index."""
        if isinstance(loop, int):
            return self._body(x, loop, access, None)
        values = loop.tolist()
        out = x.clone()
        for n in sorted(set(values)):
            sel = torch.tensor([b for b, v in enumerate(values) if v == n])
            out[sel] = self._body(x[sel], n, access, sel)
        return out

    def _body(self, x: torch.Tensor, n: int, access: CacheAccess | None, sel: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        s0 = self.config.slot(n, 0, 0)  # one loop's slots are contiguous: s0 .. s0 + slots_per_loop - 1
        if access is None:  # no cache: a fresh sequence at positions 0 .. T-1
            pos = torch.arange(T)[None, :].expand(B, T).contiguous()
            past_k, past_v = self._past(None, s0, None, 0, B)
        else:
            rows = access.rows
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop)
            rows, pos, write = (rows, access.pos, access.write_rows) if sel is None else (
                rows[sel], access.pos[sel], access.write_rows[sel])
            pos = pos.cpu().contiguous()
            past_k, past_v = self._past(access.cache, s0, rows.cpu(), int(pos[:, 0].max()), B)
        feed = {"x": x.float().contiguous().numpy(), "pos": pos.numpy(), "loop": np.array(n, dtype=np.int64),
                "past_k": past_k, "past_v": past_v}
        x, present_k, present_v = self.body_session.run(None, feed)
        if access is not None:
            for i in range(self.slots_per_loop):
                access.cache.write(s0 + i, write.cpu(), pos, torch.from_numpy(present_k[i]),
                                   torch.from_numpy(present_v[i]))
        return torch.from_numpy(x)

    def _past(self, kv_cache: KVCache | None, s0: int, rows: torch.Tensor | None, P: int, B: int):
        """Past K/V of one loop's slots for `rows`, (S, B, H, P, D) each, as contiguous numpy arrays."""
        if kv_cache is None:
            cfg = self.config
            empty = np.zeros((self.slots_per_loop, B, cfg.n_head, 0, cfg.head_dim), dtype=np.float32)
            return empty, empty
        k, v = kv_cache.k[s0:s0 + self.slots_per_loop, rows], kv_cache.v[s0:s0 + self.slots_per_loop, rows]
        k, v = k[:, :, :, :P].float().numpy(), v[:, :, :, :P].float().numpy()
        return np.ascontiguousarray(k), np.ascontiguousarray(v)

    def __call__(
        self,
        idx: torch.Tensor,
        loops: Loops = None,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Logits (B, T, V) as a CPU float32 tensor: `LoopGPT.forward`'s contract, from the same code."""
        if targets is not None:
            raise ValueError("the ONNX runner computes no loss; evaluate with the PyTorch checkpoint")
        return forward(self, idx.cpu(), loops, kv_cache, None if rows is None else rows.cpu(),
                       None if pos is None else pos.cpu()), None


def load_onnx(export_dir: str | Path, threads: int | None = None,
              providers: list[str] | None = None) -> tuple[OnnxRunner, Tokenizer, dict | None]:
    """(runner, tokenizer, eval.json contents or None) from a `loopgpt export onnx` directory."""
    read_manifest(export_dir)
    config = load_config(export_dir)
    try:
        tokenizer = load_tokenizer(config.tokenizer, export_dir)
    except TokenizerError as e:
        raise ExportError(f"{export_dir}: tokenizer {config.tokenizer!r} cannot be loaded: {e}") from e
    return OnnxRunner(export_dir, config, threads, providers), tokenizer, load_eval(export_dir)

"""OnnxRunner: the split ONNX graphs driven by onnxruntime, called exactly like `LoopGPT.forward`.

The runner drives the outer loop itself (embed, `loops` × loop body, head), so any loop count up to the
checkpoint's loop_cap and per-row loop counts work, and it keeps K/V in the same `loopgpt.model.KVCache`
as the PyTorch model, so `generate_tokens(runner, ...)` and the serving engine use it unchanged.

    python -c "from loopgpt.export import load_onnx; r, tok, _ = load_onnx('exports/demo'); \
print(r(__import__('torch').tensor([tok.encode('Hi')]), 3)[0].shape)"
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from loopgpt.model import KVCache, LoopGPTConfig, Tokenizer
from loopgpt.model.checkpoint import load_config, load_eval
from loopgpt.model.tokenizer import TokenizerError, load_tokenizer

from .onnx_export import FORMAT, MANIFEST, SPLIT, ExportError

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
    """Duck-types LoopGPT for generation and serving: `.config` and `runner(idx, loops, kv_cache, rows, pos)`."""

    def __init__(self, export_dir: str | Path, config: LoopGPTConfig, threads: int | None = None,
                 providers: list[str] | None = None):
        export_dir = Path(export_dir)
        self.config = config
        self.embed, self.body, self.head = (open_session(export_dir / f, threads, providers) for f in SPLIT)
        self.providers = self.body.get_providers()
        self.slots_per_loop = config.n_layer * config.inner_loops
        # generate_tokens reads the device and dtype of the model's lm_head weight; the graphs run in fp32
        # and take and give CPU tensors whatever provider runs them.
        self.lm_head = SimpleNamespace(weight=torch.empty(0, dtype=torch.float32))

    def eval(self) -> OnnxRunner:
        return self

    def _check_loops(self, loops: int | torch.Tensor | None, B: int) -> torch.Tensor:
        cap = self.config.loop_cap
        if loops is None:
            loops = self.config.max_loops
        if isinstance(loops, int):
            if not 1 <= loops <= cap:
                raise ValueError(f"loops must be in 1..{cap}, got {loops}")
            return torch.full((B,), loops, dtype=torch.long)
        loops = loops.to(dtype=torch.long, device="cpu")
        if loops.shape != (B,):
            raise ValueError(f"per-row loops must have shape ({B},), got {tuple(loops.shape)}")
        if int(loops.min()) < 1 or int(loops.max()) > cap:
            raise ValueError(f"loops must be in 1..{cap}, got {loops.tolist()}")
        return loops

    def _past(self, kv_cache: KVCache | None, s0: int, rows: torch.Tensor, P: int, B: int):
        """Past K/V of one loop's slots for `rows`, (S, B, H, P, D) each, as contiguous numpy arrays."""
        if kv_cache is None:
            cfg = self.config
            empty = np.zeros((self.slots_per_loop, B, cfg.n_head, 0, cfg.head_dim), dtype=np.float32)
            return empty, empty
        k, v = kv_cache.k[s0:s0 + self.slots_per_loop], kv_cache.v[s0:s0 + self.slots_per_loop]
        if not (rows.numel() == kv_cache.batch_size and bool((rows == torch.arange(rows.numel())).all())):
            k, v = k[:, rows], v[:, rows]  # a gather; all rows in order stay a view until the copy below
        return np.ascontiguousarray(k[:, :, :, :P].numpy()), np.ascontiguousarray(v[:, :, :, :P].numpy())

    def __call__(
        self,
        idx: torch.Tensor,
        loops: int | torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Logits (B, T, V) as a CPU float32 tensor; the same cache contract as `LoopGPT.forward`."""
        if targets is not None:
            raise ValueError("the ONNX runner computes no loss; evaluate with the PyTorch checkpoint")
        cfg = self.config
        idx = idx.cpu()
        B, T = idx.shape
        row_loops = self._check_loops(loops, B)
        if kv_cache is not None:
            rows = torch.arange(B) if rows is None else rows.cpu()
            if pos is None:
                pos = kv_cache.lengths[rows][:, None] + torch.arange(T)  # (B, T)
            if int(row_loops.max()) > kv_cache.loops:
                raise ValueError(f"KV cache holds {kv_cache.loops} loops, {int(row_loops.max())} requested")
            if int(pos.max()) >= kv_cache.max_len:
                raise ValueError(f"position {int(pos.max())} is beyond the KV cache length {kv_cache.max_len}")
        elif pos is None:
            pos = torch.arange(T)[None, :].expand(B, T)
        if T > cfg.block_size or int(pos.max()) >= cfg.block_size:
            raise ValueError(f"sequence reaches position {int(pos.max())}, beyond the context of {cfg.block_size}")
        pos = pos.cpu().contiguous()
        x = self.embed.run(None, {"idx": idx.numpy(), "pos": pos.numpy()})[0]  # (B, T, C)
        for n in range(int(row_loops.max())):
            active = (row_loops > n).nonzero().squeeze(1)
            whole = active.numel() == B
            xa, pa = (x, pos) if whole else (x[active.numpy()], pos[active])
            ra = None if kv_cache is None else (rows if whole else rows[active])
            s0 = cfg.slot(n, 0, 0)  # one loop's slots are contiguous: s0 .. s0 + slots_per_loop - 1
            past_k, past_v = self._past(kv_cache, s0, ra, int(pa[:, 0].max()), xa.shape[0])
            feed = {"x": xa, "pos": pa.numpy(), "loop": np.array(n, dtype=np.int64), "past_k": past_k, "past_v": past_v}
            xa, present_k, present_v = self.body.run(None, feed)
            if kv_cache is not None:
                for i in range(self.slots_per_loop):
                    kv_cache.write(s0 + i, ra, pa, torch.from_numpy(present_k[i]), torch.from_numpy(present_v[i]))
            if whole:
                x = xa
            else:
                x = x.copy()
                x[active.numpy()] = xa
        if kv_cache is not None:
            kv_cache.lengths[rows] = pos[:, -1] + 1
        logits = self.head.run(None, {"x": x})[0]  # (B, T, V)
        return torch.from_numpy(logits), None


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not Path(export_dir).is_dir():
        raise ExportError(f"{export_dir}: export directory does not exist; run `loopgpt export onnx` first")
    if not path.is_file():
        raise ExportError(f"{path}: manifest is missing; is this a `loopgpt export onnx` directory?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} manifest; re-export with this version of loopgpt")
    for name in SPLIT:
        if not (Path(export_dir) / name).is_file():
            raise ExportError(f"{Path(export_dir) / name}: graph file is missing; re-run the export")
    return manifest


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

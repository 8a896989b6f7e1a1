"""ModelRunner: the one place that knows about devices, dtypes, the KV cache and the step's device buffers.

The engine decides *what* runs (a `StepPlan`: prompt chunks to prefill, decoding rows at their loop
index, rows to sample); the runner runs it: prefill forwards, then ONE continuous-depth decode step
(`loopgpt.model.step`) padded to a batch bucket, then one head + sampling call for every row that
finished its last loop, and starts copying the sampled tokens back. It never waits for the device
inside a step: inputs go up through pinned buffers, outputs come back through pinned buffers and a
CUDA event that the engine waits on one step later, while the GPU already runs the next step.

Opt-in speedups (held here, never baked into the model): `compile` (torch.compile of the step) and
`cuda_graphs` (one graph per batch/context bucket, replayed). Eager stays the reference.

    python -c "from loopgpt.server.runner import load_backend; print(load_backend('checkpoints/demo'))"
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loopgpt.model import KVCache, SamplingParams, Tokenizer, load_checkpoint, resolve_device, resolve_dtype
from loopgpt.model.step import OUT_FIELDS, StepState, decode_step, head_step, prefill


class BackendError(ValueError):
    """A backend or device that cannot be used; the message says what to do instead."""


ONNX_MISSING = "--backend onnx needs the ONNX runtime: pip install 'loopgpt[export]'"


@dataclass
class Loaded:
    """What `loopgpt serve` needs from a checkpoint, whatever the backend."""

    model: Any  # a loopgpt.model.forward.LoopModel: LoopGPT or the ONNX runner
    tokenizer: Tokenizer
    evals: dict | None
    name: str
    device: str
    dtype: torch.dtype = torch.float32


def load_backend(checkpoint: str | Path, backend: str = "torch", device: str = "auto", dtype: str = "auto",
                 onnx_loader: Callable | None = None) -> Loaded:
    """Load a checkpoint (torch) or an export directory (onnx) for serving.

    `onnx_loader` is `loopgpt.export.runtime.load_onnx`, handed in by the CLI: server/ does not import
    export/ (parts meet only through model/)."""
    name = Path(checkpoint).resolve().name
    if backend == "torch":
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model, tokenizer, evals = load_checkpoint(checkpoint, device=dev, dtype=dt)
        return Loaded(model, tokenizer, evals, name, dev, dt)
    if backend == "onnx":
        if onnx_loader is None:
            raise BackendError(ONNX_MISSING)
        if dtype not in ("auto", "float32"):
            raise BackendError(f"--backend onnx runs the exported float32 graphs; --dtype {dtype} is torch-only")
        runner, tokenizer, evals = onnx_loader(checkpoint)
        return Loaded(runner, tokenizer, evals, name, "cpu")
    raise BackendError(f"--backend must be torch or onnx, got {backend!r}")


def buckets(limit: int) -> list[int]:
    """Batch sizes a step is padded to: powers of two, then `limit` itself."""
    out = [1]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return sorted(set(out + [limit]))


def pad_to(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


def ctx_bucket(n: int, max_len: int) -> int:
    """Keys a decode step reads: the next power of two >= n (at least 16), so shapes repeat."""
    return min(max_len, max(16, 1 << (n - 1).bit_length()))


@dataclass
class PrefillChunk:
    row: int
    ids: list[int]  # prompt tokens start .. start + len(ids) - 1
    start: int
    loops: int
    targets: list[int] | None = None  # what each position predicts, with prompt scoring on


@dataclass
class Sample:
    """A row to sample after this step's loop: its sampling parameters and RNG position."""

    row: int
    params: SamplingParams
    seed: int
    counter: int  # index of the token being sampled in its request


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # decoding rows, one loop each
    pos: list[int] = field(default_factory=list)
    loop: list[int] = field(default_factory=list)  # 0-based loop index each row runs now
    samples: list[Sample] = field(default_factory=list)  # rows whose token is complete after this step


@dataclass
class Pending:
    """Sampled tokens on their way back to the host."""

    host: torch.Tensor  # (>= n, len(OUT_FIELDS)) float32, pinned on CUDA
    n: int
    event: Any = None  # torch.cuda.Event, or None when the copy was synchronous

    def result(self) -> list[list[float]]:
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        return self.host[: self.n].tolist()


# Rows of the step's integer and float input buffers.
ROWS, POS, LOOP, HEAD_ROWS, SEED, COUNTER, TOP_K = range(7)
TEMPERATURE, TOP_P = range(2)


class ModelRunner:
    """Owns the model, one preallocated KV cache of `max_batch` rows (+1 scratch row) and the step buffers."""

    def __init__(self, model: Any, max_batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False, cuda_graphs: bool = False, max_loops: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.config = model.config
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.scratch = max_batch  # padded batch rows read and write this cache row; nothing else does
        if cuda_graphs and self.device.type != "cuda":
            raise BackendError("--cuda-graphs needs a CUDA device (--device cuda)")
        # K/V slots for loops up to `max_loops` (default: the checkpoint's loop_cap); deeper requests are refused
        self.cache = KVCache(self.config, max_batch + 1, loops=max_loops, device=self.device, dtype=dtype)
        self.state = StepState.allocate(max_batch + 1, self.config.n_embd, self.device, dtype)
        self.sizes = buckets(max_batch)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda
        # Two host slots, alternated per step: a slot is rewritten only after its previous copy completed.
        self.h_long = [torch.zeros(7, max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.h_float = [torch.zeros(2, max_batch, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        # numpy views of the same memory: filling them from Python lists costs a microsecond, a torch.tensor() ten
        self.np_long = [h.numpy() for h in self.h_long]
        self.np_float = [h.numpy() for h in self.h_float]
        self.h_out = [torch.zeros(max_batch, len(OUT_FIELDS), pin_memory=pin) for _ in range(2)]
        self.d_long = torch.zeros(7, max_batch, dtype=torch.long, device=self.device)
        self.d_float = torch.zeros(2, max_batch, dtype=torch.float32, device=self.device)
        self.d_out = torch.zeros(max_batch, len(OUT_FIELDS), device=self.device)
        self.turn = 0
        self.slot_done: list[Any] = [None, None]  # per host slot: the event after its last copies
        self.graphs: dict[tuple, Any] = {}
        self.pool = None
        self.cuda_graphs = cuda_graphs
        # dynamic: one compiled kernel set serves every batch and context bucket (a static compile per bucket
        # would mean dozens of compiles at start-up); CUDA graphs then freeze each bucket's shapes
        self._decode = torch.compile(self._decode_fn, dynamic=True) if compile else self._decode_fn
        self._head = torch.compile(self._head_fn, dynamic=True) if compile else self._head_fn

    def context(self) -> contextlib.AbstractContextManager:
        """Entered once by the engine thread around its whole loop (inference mode is per thread)."""
        return torch.inference_mode()

    # ---- the step ----

    def run(self, plan: StepPlan) -> Pending | None:
        """Launch a plan's prefills, decode step and sampling; the sampled tokens arrive through `Pending`."""
        slot = self.turn % 2
        self.turn += 1
        done = self.slot_done[slot]
        if done is not None and not done.query():  # two steps old: long done, unless the host runs far ahead
            done.synchronize()
        try:
            return self._run(plan, slot)
        finally:
            if self.cuda:
                self.slot_done[slot] = torch.cuda.Event()
                self.slot_done[slot].record()

    def _run(self, plan: StepPlan, slot: int) -> Pending | None:
        if plan.prefill:
            self._prefill(plan.prefill)
        h, f = self.np_long[slot], self.np_float[slot]
        B = pad_to(len(plan.rows), self.sizes) if plan.rows else 0
        if B:
            self._fill(h[ROWS], plan.rows, B, self.scratch)
            self._fill(h[POS], plan.pos, B, 0)
            self._fill(h[LOOP], plan.loop, B, 0)
        samples = plan.samples
        Bh = pad_to(len(samples), self.sizes) if samples else 0
        if Bh:
            self._fill(h[HEAD_ROWS], [s.row for s in samples], Bh, self.scratch)
            self._fill(h[SEED], [s.seed for s in samples], Bh, 0)
            self._fill(h[COUNTER], [s.counter for s in samples], Bh, 0)
            self._fill(h[TOP_K], [s.params.top_k for s in samples], Bh, 0)
            self._fill(f[TEMPERATURE], [s.params.temperature for s in samples], Bh, 0.0)
            self._fill(f[TOP_P], [s.params.top_p for s in samples], Bh, 1.0)
        # Whole buffers, contiguous and pinned: truly asynchronous copies (a strided one would be staged by the host).
        self.d_long.copy_(self.h_long[slot], non_blocking=True)
        self.d_float.copy_(self.h_float[slot], non_blocking=True)
        if B:
            ctx = ctx_bucket(max(plan.pos) + 1, self.cache.max_len)
            self._replay(("decode", B, ctx), lambda: self._decode(B, ctx))
        if not Bh:
            return None
        random = any(not s.params.greedy for s in samples)
        filtered = any(s.params.filtered for s in samples)
        self._replay(("head", Bh, random, filtered), lambda: self._head(Bh, random, filtered))
        out = self.h_out[slot]
        out[:Bh].copy_(self.d_out[:Bh], non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return Pending(out, len(samples), event)

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        targets = [c.targets or [] for c in chunks] if any(c.targets for c in chunks) else None
        rows = [c.row for c in chunks]
        last = prefill(self.model, self.cache, self.state, rows, [c.ids for c in chunks], [c.start for c in chunks],
                       [c.loops for c in chunks], self.scratch, targets)
        # A completed prompt is sampled from its last hidden state like any row after its last loop.
        self.state.hidden[torch.tensor(rows, device=self.device)] = last.to(self.state.hidden.dtype)

    @staticmethod
    def _fill(dst, values: list, size: int, pad) -> None:
        """Write `values` then padding up to `size` into a row of a host buffer (numpy view)."""
        n = len(values)
        dst[:n] = values
        dst[n:size] = pad

    def _decode_fn(self, B: int, ctx: int) -> None:
        d = self.d_long
        decode_step(self.model, self.cache, self.state, d[ROWS, :B], d[POS, :B], d[LOOP, :B], ctx)

    def _head_fn(self, Bh: int, random: bool, filtered: bool) -> None:
        d, f = self.d_long, self.d_float
        rows = d[HEAD_ROWS, :Bh]
        self.d_out[:Bh] = head_step(self.model, self.state, self.state.hidden[rows], rows, f[TEMPERATURE, :Bh],
                                    d[TOP_K, :Bh], f[TOP_P, :Bh], d[SEED, :Bh], d[COUNTER, :Bh], random, filtered)

    # ---- CUDA graphs ----

    def _replay(self, key: tuple, fn: Callable[[], None]) -> None:
        if not self.cuda_graphs:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(key, fn)
        graph.replay()

    def _capture(self, key: tuple, fn: Callable[[], None]):
        """Warm up and capture `fn` as a graph. The inputs it reads are pointed at the scratch row first:
        warm-up runs really execute, and must not write into a live request's cache row."""
        saved = self.d_long.clone(), self.d_float.clone()
        self.d_long[ROWS].fill_(self.scratch)
        self.d_long[HEAD_ROWS].fill_(self.scratch)
        self.d_long[POS].zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        self.d_long.copy_(saved[0])
        self.d_float.copy_(saved[1])
        return graph

    def warmup(self, max_ctx: int | None = None) -> int:
        """Capture (or compile) every decode and head variant up front, so no request pays for it; returns the
        number of variants. Contexts up to `max_ctx` (default: the whole cache)."""
        limit = max_ctx or self.cache.max_len
        self.d_long[ROWS].fill_(self.scratch)  # warm-up steps really run: on the scratch row only
        self.d_long[HEAD_ROWS].fill_(self.scratch)
        ctxs = sorted({ctx_bucket(n, self.cache.max_len) for n in range(1, limit + 1)})
        keys = [("decode", B, c) for B in self.sizes for c in ctxs]
        keys += [("head", B, r, f) for B in self.sizes for r, f in ((False, False), (True, False), (True, True))]
        for key in keys:
            if key[0] == "decode":
                self._replay(key, lambda k=key: self._decode(k[1], k[2]))
            else:
                self._replay(key, lambda k=key: self._head(k[1], k[2], k[3]))
        if self.cuda:
            torch.cuda.synchronize()
        return len(keys)

    def free(self, row: int) -> None:
        """Nothing to clear: a reused row's stale K/V sit at positions its next request writes before reading."""
        assert 0 <= row < self.max_batch

"""ModelRunner: the one place that knows about devices, dtypes, the KV cache and the step's device buffers.

The engine decides *what* runs (a `StepPlan`: prompt chunks to prefill, decoding rows at their loop
index, rows to sample); the runner runs it: prefill forwards, then ONE continuous-depth decode step
(`loopgpt.model.step`) padded to a batch bucket, then one head + sampling call for every row that
finished its last loop, and starts copying the sampled tokens back. It never waits for the device
inside a step: inputs go up through pinned buffers, outputs come back through pinned buffers and a
CUDA event that the engine waits on one step later, while the GPU already runs the next step.

Opt-in speedups (held here, never baked into the model): `compile` (torch.compile of the step) and
`cuda_graphs` (one graph per batch/context bucket, replayed). Eager stays the reference.

    python -c "from loopgpt.server.engine import ModelRunner; help(ModelRunner)"
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
from loopgpt.model import KVCache
from loopgpt.model.adaptive import copy_exit_kv
from loopgpt.model.step import OUT_FIELDS, PLAIN, TOP_FIELDS, StepState, decode_step, head_step, prefill, score_states

from .loading import BackendError
from .plan import Fork, Pending, PrefillChunk, StepPlan
from .prefix_cache import PrefixCache


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
class StepCosts:
    """Seconds of one eager decode call on this machine, as (fixed, per entry): `uniform` for entries at one loop
    index (one K/V slot and one gate for all), `gathered` for entries at their own loops (each entry's slot and gate
    gathered). Measured when the runner starts (`measure`); it decides whether a step whose entries stand at k loop
    indices runs as k uniform calls or one gathered call."""

    uniform: tuple[float, float] = (0.0, 0.0)
    gathered: tuple[float, float] = (0.0, 0.0)

    def grouped_cheaper(self, sizes: list[int]) -> bool:
        (a, b), (c, d), n = self.uniform, self.gathered, sum(sizes)
        return len(sizes) * a + b * n < c + d * n

    @classmethod
    def measure(cls, runner: ModelRunner, reps: int = 5) -> StepCosts:
        """Time both call kinds at 1 and `max_batch` entries on the scratch row and lane (nothing live is touched)."""
        def seconds(n: int, per_row: bool) -> float:
            dev = runner.device
            lanes = torch.full((n,), runner.scratch_lane, device=dev)
            rows = torch.full((n,), runner.scratch, device=dev)
            pos = torch.arange(n, device=dev) % runner.cache.max_len
            loop = torch.arange(n, device=dev) % 2 if per_row else 1
            ctx = ctx_bucket(n, runner.cache.max_len)
            times = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                decode_step(runner.model, runner.cache, runner.state, lanes, rows, pos, loop, ctx)
                times.append(time.perf_counter() - t)
            return min(times[1:])  # the least disturbed run: the machine may be shared

        big = max(2, runner.max_batch)
        with torch.inference_mode():
            fits = []
            for per_row in (False, True):
                one, many = seconds(1, per_row), seconds(big, per_row)
                slope = max(0.0, (many - one) / (big - 1))
                fits.append((max(0.0, one - slope), slope))
        return cls(*fits)


# Rows of the step's integer and float input buffers.
LANE, ROW, POS, LOOP, H_SRC, H_DST, H_ROW, SEED, COUNTER, TOP_K, MODE, BAN = range(12)
TEMPERATURE, TOP_P = range(2)


def consecutive(rows: list[int]) -> slice | None:
    """`rows` as a slice when they run up by one, each row once (see `decode_step`'s span); else None."""
    return slice(rows[0], rows[0] + len(rows)) if rows and rows == list(range(rows[0], rows[0] + len(rows))) else None


def packs(chunks: list[PrefillChunk], waste: float = 0.25) -> list[list[PrefillChunk]]:
    """Prefill chunks in forwards of similar lengths, longest first. One forward pads every chunk to its longest:
    a prefix-cache hit's 20-token suffix beside a 128-token prompt would compute 108 positions for nothing (lm-eval's
    scoring mixes them all the time), while an extra forward costs about a millisecond. A chunk joins the current
    forward while padding stays within `waste` of its positions."""
    out: list[list[PrefillChunk]] = []
    for c in sorted(chunks, key=lambda c: -len(c.ids)):
        cur = out[-1] if out else None
        if cur is None or len(cur[0].ids) * (len(cur) + 1) > (1 + waste) * (sum(len(x.ids) for x in cur) + len(c.ids)):
            out.append([c])
        else:
            cur.append(c)
    return out


class ModelRunner:
    """Owns the model, one preallocated KV cache of `max_batch` rows (+1 scratch row), the step buffers and, with
    `lanes_per_row` > 1 (self-speculative decoding), room for several tokens in flight per row."""

    def __init__(self, model: Any, max_batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compile: bool = False, cuda_graphs: bool = False, max_loops: int | None = None,
                 lanes_per_row: int = 1, prefix_cache_bytes: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if cuda_graphs and torch.device(device).type != "cuda":
            raise BackendError("--cuda-graphs needs a CUDA device (--device cuda)")
        self.model = model
        self.config = model.config
        self.device = torch.device(device)
        self.max_batch, self.lanes_per_row = max_batch, lanes_per_row
        self.scratch = max_batch  # padded entries read and write this cache row; nothing else does
        self.scratch_lane = max_batch * lanes_per_row
        # K/V slots for loops up to `max_loops` (default: the checkpoint's loop_cap); deeper requests are refused
        self.cache = KVCache(self.config, max_batch + 1, loops=max_loops, device=self.device, dtype=dtype)
        # Prompt prefixes kept across requests; none with a KV budget, whose shared slots hold depth-specific K/V
        self.prefix = (PrefixCache(self.cache, prefix_cache_bytes)
                       if prefix_cache_bytes > 0 and self.config.kv_budget == 0 else None)
        vocab = self.config.vocab_size if lanes_per_row > 1 else 0
        self.state = StepState.allocate(self.scratch_lane + 1, max_batch + 1, self.config.n_embd, self.device, dtype,
                                        vocab, ban_vocab=self.config.vocab_size)
        self.scores: dict[int, list[torch.Tensor]] = {}  # cache row -> its prompt's score tables, on the host
        entries = max_batch * lanes_per_row
        self.sizes = buckets(entries)
        self.cuda = self.device.type == "cuda"
        pin = self.cuda
        # Two host slots, alternated per step: a slot is rewritten only after its previous copy completed.
        self.h_long = [torch.zeros(12, entries, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.h_float = [torch.zeros(2, entries, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        # numpy views of the same memory: filling them from Python lists costs a microsecond, a torch.tensor() ten
        self.np_long = [h.numpy() for h in self.h_long]
        self.np_float = [h.numpy() for h in self.h_float]
        self.h_out = [torch.zeros(entries, len(OUT_FIELDS) + TOP_FIELDS, pin_memory=pin) for _ in range(2)]
        self.d_long = torch.zeros(12, entries, dtype=torch.long, device=self.device)
        self.d_float = torch.zeros(2, entries, dtype=torch.float32, device=self.device)
        self.d_out = torch.zeros(entries, len(OUT_FIELDS) + TOP_FIELDS, device=self.device)
        self.d_conv = torch.zeros(entries, device=self.device)
        self.h_conv = [torch.zeros(entries, pin_memory=pin) for _ in range(2)]
        self.turn = 0
        # The token_entropy metric is sampled on a CPU: one head call in 8 computes it (a log-softmax over the
        # vocabulary costs as much as the head's matmul at 32 rows of GPT-2's vocabulary, scripts/head_cost.py);
        # the NLL (one logsumexp) is always there, as the sampled token's logprob needs it. On a GPU: every call.
        self.heads, self.entropy_every = 0, 1 if self.device.type == "cuda" else 8
        self.seconds = dict.fromkeys(("prefill", "decode", "head"), 0.0)
        self.slot_done: list[Any] = [None, None]  # per host slot: the event after its last copies
        self.graphs: dict[tuple, Any] = {}
        self.pool = None
        self.cuda_graphs = cuda_graphs
        self.eager = not (compile or cuda_graphs)
        # dynamic: one compiled kernel set serves every batch and context bucket (a static compile per bucket
        # would mean dozens of compiles at start-up); CUDA graphs then freeze each bucket's shapes
        self._decode = torch.compile(self._decode_fn, dynamic=True) if compile else self._decode_fn
        self._head = torch.compile(self._head_fn, dynamic=True) if compile else self._head_fn
        self.costs = StepCosts.measure(self) if self.eager and not self.cuda else StepCosts()

    def lane(self, row: int, pos: int) -> int:
        """The lane of the token at `pos` of cache row `row`: tokens in flight have consecutive positions, so
        position mod lanes_per_row never collides."""
        return row * self.lanes_per_row + pos % self.lanes_per_row

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
        t = time.perf_counter()
        for load in plan.prefix_loads:  # cached prefixes first: the suffixes' prefill reads them
            self._load_prefix(*load)
        if plan.prefill:
            self._prefill(plan.prefill)
        for row, ids, loops in plan.prefix_stores:
            self.prefix.store(row, ids, loops)
        if plan.prefill or plan.prefix_loads:
            t = self._clock("prefill", t)
        for fork in plan.forks:
            self._fork(fork)
        for (exit_loop, budget), group in groupby(sorted(plan.kv_copies, key=lambda c: c[2:]), key=lambda c: c[2:]):
            group = list(group)
            rows = torch.tensor([c[0] for c in group], device=self.device)
            copy_exit_kv(self.cache, rows, torch.tensor([c[1] for c in group], device=self.device), exit_loop, budget)
        h, f = self.np_long[slot], self.np_float[slot]
        if plan.repeat > 1:
            return self._run_lockstep(plan, slot)
        groups = self._groups(plan)
        if self.eager and not self.cuda and not plan.convergence and plan.lanes:
            # entries sorted by loop (one call per loop index, each reading one K/V slot with one gate), then by
            # row (consecutive rows read their keys as one view); convergence values are read back by entry
            order = sorted(range(len(plan.loop)), key=lambda i: (plan.loop[i], plan.rows[i]))
            plan = dataclasses.replace(plan, **{k: [getattr(plan, k)[i] for i in order]
                                                for k in ("lanes", "rows", "pos", "loop")})
        # Padding to a bucket lets graphs and compiled kernels repeat their shapes; eager runs the exact batch.
        B = (len(plan.lanes) if self.eager else pad_to(len(plan.lanes), self.sizes)) if plan.lanes else 0
        if B:
            self._fill(h[LANE], plan.lanes, B, self.scratch_lane)
            self._fill(h[ROW], plan.rows, B, self.scratch)
            self._fill(h[POS], plan.pos, B, 0)
            self._fill(h[LOOP], plan.loop, B, 0)
        samples = plan.samples
        Bh = (len(samples) if self.eager else pad_to(len(samples), self.sizes)) if samples else 0
        if Bh:
            self._fill(h[H_SRC], [s.src for s in samples], Bh, self.scratch_lane)
            self._fill(h[H_DST], [s.dst for s in samples], Bh, self.scratch_lane)
            self._fill(h[H_ROW], [s.row for s in samples], Bh, self.scratch)
            self._fill(h[SEED], [s.seed for s in samples], Bh, 0)
            self._fill(h[COUNTER], [s.counter for s in samples], Bh, 0)
            vocab = self.config.vocab_size  # a top_k beyond the vocabulary filters nothing (and may not fit int64)
            self._fill(h[TOP_K], [min(s.params.top_k, vocab) for s in samples], Bh, 0)
            self._fill(h[MODE], [s.mode for s in samples], Bh, PLAIN)
            self._fill(h[BAN], [s.ban for s in samples], Bh, 0)
            self._fill(f[TEMPERATURE], [s.params.temperature for s in samples], Bh, 0.0)
            self._fill(f[TOP_P], [s.params.top_p for s in samples], Bh, 1.0)
        # Whole buffers, contiguous and pinned: truly asynchronous copies (a strided one would be staged by the host).
        self.d_long.copy_(self.h_long[slot], non_blocking=True)
        self.d_float.copy_(self.h_float[slot], non_blocking=True)
        if B:
            if groups:
                for loop, start, end in groups:
                    self._decode_fn(end - start, ctx_bucket(max(plan.pos[start:end]) + 1, self.cache.max_len), loop,
                                    start, consecutive(plan.rows[start:end]), converge=False)
            elif self.eager and min(plan.loop) == max(plan.loop):  # the CPU fast path: one slot, one gate
                self._decode_fn(B, ctx_bucket(max(plan.pos) + 1, self.cache.max_len), plan.loop[0], 0,
                                consecutive(plan.rows), converge=plan.convergence)
            else:
                ctx = ctx_bucket(max(plan.pos) + 1, self.cache.max_len)
                self._replay(("decode", B, ctx), lambda: self._decode(B, ctx))
            t = self._clock("decode", t)
        conv = None
        if plan.convergence and B:
            conv = self.h_conv[slot]
            conv[:B].copy_(self.d_conv[:B], non_blocking=True)
        if not Bh:
            return None if conv is None else self._pending(self.h_out[slot], 0, conv)
        random = any(not s.params.greedy for s in samples)
        filtered = any(s.params.filtered for s in samples)
        spec = any(s.mode != PLAIN for s in samples)
        ban, top = any(s.ban for s in samples), any(s.top for s in samples)
        entropy = self.heads % self.entropy_every == 0
        self.heads += 1
        self._replay(("head", Bh, random, filtered, spec, ban, top, entropy),
                     lambda: self._head(Bh, random, filtered, spec, ban, top, entropy))
        self._clock("head", t)
        out = self.h_out[slot]
        out[:Bh].copy_(self.d_out[:Bh], non_blocking=True)
        return self._pending(out, len(samples), conv)

    def _pending(self, out: torch.Tensor, n: int, conv: torch.Tensor | None) -> Pending:
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return Pending(out, n, event, conv)

    def _clock(self, phase: str, since: float) -> float:
        """Host time per phase of the runner (the model's time on a CPU; the launches on a GPU)."""
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now

    def _run_lockstep(self, plan: StepPlan, slot: int) -> Pending | None:
        """`repeat` consecutive loops of the same entries (eager only; see Engine._lockstep), then the head."""
        n = len(plan.lanes) // plan.repeat
        assert self.eager and n * plan.repeat == len(plan.lanes) and plan.loop[:n] == [0] * n
        first = StepPlan(lanes=plan.lanes[:n], rows=plan.rows[:n], pos=plan.pos[:n], loop=plan.loop[:n])
        self._run(first, slot)
        ctx, span = ctx_bucket(max(first.pos) + 1, self.cache.max_len), consecutive(sorted(first.rows))
        for loop in range(1, plan.repeat):  # the entries as _run left them on the device: sorted by row
            self._decode_fn(n, ctx, loop, 0, span, converge=False)
        return self._run(StepPlan(samples=plan.samples), slot)

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        """Plain chunks batched by `packs`; adaptive ones (loops "auto") apart per (tolerance, min, budget)."""
        key = lambda c: (c.adaptive is not None, c.adaptive or (), c.loops if c.adaptive else 0)  # noqa: E731
        for (adaptive, _, _), same in groupby(sorted(chunks, key=key), key=key):
            for group in packs(list(same)):
                self._prefill_group(group, adaptive)

    def _prefill_group(self, group: list[PrefillChunk], adaptive: bool) -> None:
        """One padded forward over `group` (see `prefill`), then what the turn keeps of it."""
        targets = [c.targets or [] for c in group] if any(c.targets for c in group) else None
        rows = [c.row for c in group]
        scores: list[torch.Tensor] | None = [] if any(c.scored and c.targets for c in group) else None
        states: list[torch.Tensor] | None = [] if self.prefix is not None and not adaptive else None
        last = prefill(self.model, self.cache, self.state, rows, [c.ids for c in group],
                       [c.start for c in group], [c.loops for c in group], self.scratch, targets,
                       group[0].adaptive if adaptive else None, scores, states)
        for i, c in enumerate(group if states else ()):
            self.prefix.keep(c.row, c.start, states[0][i, :len(c.ids)])
        for i, c in enumerate([c for c in group if c.targets] if scores else ()):  # the table's rows
            if c.scored:
                # on its way to the host with the turn's other outputs (pinned, asynchronous on CUDA)
                self.scores.setdefault(c.row, []).append(
                    scores[0][i, :len(c.targets)].to("cpu", non_blocking=True))
        # A completed prompt is sampled from its last hidden state, kept in the lane of its last token.
        lanes = [self.lane(c.row, c.start + len(c.ids) - 1) for c in group]
        self.state.hidden[torch.tensor(lanes, device=self.device)] = last.to(self.state.hidden.dtype)

    def _load_prefix(self, row: int, blocks: list[Any], loops: int, targets: list[int] | None, table: bool) -> None:
        """A cached prefix into cache row `row`; echo's cached positions are scored from their states (`targets`:
        what each predicts) and their table kept with `table`, as the prefill does for the rest."""
        self.prefix.load(self.model, row, blocks, loops)
        rows = torch.tensor([row], device=self.device)
        self.state.prompt_nll[rows] = 0.0  # the prefill's chunks add to it from the first uncached position on
        if targets is None:
            return
        scores: list[torch.Tensor] | None = [] if table else None
        score_states(self.model, self.state, self.prefix.states[row, :len(targets)][None], [targets], rows, scores)
        if scores:
            self.scores.setdefault(row, []).append(scores[0][0].to("cpu", non_blocking=True))

    def _fork(self, fork: Fork) -> None:
        rows = torch.tensor(fork.rows, device=self.device)
        self.cache.copy_rows(fork.src, rows, fork.length)
        self.state.hidden[torch.tensor(fork.lanes, device=self.device)] = self.state.hidden[fork.src_lane].clone()
        self.state.prompt_nll[rows] = self.state.prompt_nll[fork.src].clone()

    def take_scores(self, row: int) -> list[list[float]]:
        """The scored prompt chunks of cache row `row` (call once the turn that completed its prompt is back):
        per target position, [log-probability, TOP_LOGPROBS top values, their ids]."""
        return [r for t in self.scores.pop(row, []) for r in t.tolist()]

    def ban(self, row: int, tokens: list[int]) -> None:
        """The tokens that cache row `row` may not sample while its head rows carry `ban` (min_tokens); set at
        admission, before the row's first step, through pinned memory (no wait on the device)."""
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, pin_memory=self.cuda)
        mask[tokens] = True
        self.state.banned[row].copy_(mask, non_blocking=True)

    @staticmethod
    def _fill(dst, values: list, size: int, pad) -> None:
        """Write `values` then padding up to `size` into a row of a host buffer (numpy view)."""
        n = len(values)
        dst[:n] = values
        dst[n:size] = pad

    def _decode_fn(self, B: int, ctx: int, loop: int | None = None, start: int = 0, span: slice | None = None,
                   converge: bool = True) -> None:
        d, end = self.d_long, start + B
        conv = decode_step(self.model, self.cache, self.state, d[LANE, start:end], d[ROW, start:end], d[POS, start:end],
                           d[LOOP, start:end] if loop is None else loop, ctx, span, converge)
        if conv is not None:
            self.d_conv[start:end] = conv

    def _groups(self, plan: StepPlan) -> list[tuple[int, int, int]]:
        """(loop, start, end) of each loop index's entries once sorted by loop, when one call per loop index
        costs less than one call gathering every entry's own slot and gate (the cost model measured at start-up,
        `StepCosts`); [] for one gathered call. Eager CPU only: graphs and compile keep one call per step."""
        if not self.eager or self.cuda or plan.convergence or not plan.lanes:
            return []
        sizes = collections.Counter(plan.loop)
        if len(sizes) == 1 or not self.costs.grouped_cheaper(list(sizes.values())):
            return []
        out, start = [], 0
        for loop in sorted(sizes):
            out.append((loop, start, start + sizes[loop]))
            start += sizes[loop]
        return out

    def _head_fn(self, Bh: int, random: bool, filtered: bool, spec: bool, ban: bool = False,
                 top: bool = False, entropy: bool = True) -> None:
        d, f = self.d_long, self.d_float
        width = len(OUT_FIELDS) + (TOP_FIELDS if top else 0)
        self.d_out[:Bh, :width] = head_step(self.model, self.state, d[H_SRC, :Bh], d[H_DST, :Bh], d[H_ROW, :Bh],
                                            f[TEMPERATURE, :Bh], d[TOP_K, :Bh], f[TOP_P, :Bh], d[SEED, :Bh],
                                            d[COUNTER, :Bh], d[MODE, :Bh] if spec else None, random, filtered,
                                            d[BAN, :Bh] > 0 if ban else None, top, entropy)

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
        self._point_at_scratch()
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
        with self.context():  # as the engine thread runs them: no autograd state recorded into a graph
            return self._warmup(max_ctx)

    def _warmup(self, max_ctx: int | None) -> int:
        limit = max_ctx or self.cache.max_len
        self._point_at_scratch()  # warm-up steps really run: on the scratch row and lane only
        ctxs = sorted({ctx_bucket(n, self.cache.max_len) for n in range(1, limit + 1)})
        keys = [("decode", B, c) for B in self.sizes for c in ctxs]
        modes = [(r, f) for r, f in ((False, False), (True, False), (True, True))]
        specs = (False, True) if self.lanes_per_row > 1 else (False,)
        flags = [(b, t) for b in (False, True) for t in (False, True)]  # ban (min_tokens), top (logprobs)
        entropy = (True, False) if self.entropy_every > 1 else (True,)
        keys += [("head", B, r, f, s, b, t, e) for B in self.sizes for r, f in modes for s in specs for b, t in flags
                 for e in entropy]
        for key in keys:
            if key[0] == "decode":
                self._replay(key, lambda k=key: self._decode(k[1], k[2]))
            else:
                self._replay(key, lambda k=key: self._head(*k[1:]))
        if self.cuda:
            torch.cuda.synchronize()
        return len(keys)

    def _point_at_scratch(self) -> None:
        self.d_long[[LANE, H_SRC, H_DST]] = self.scratch_lane
        self.d_long[[ROW, H_ROW]] = self.scratch
        self.d_long[[POS, LOOP, MODE, BAN]] = 0

    def free(self, row: int) -> None:
        """Nothing to clear: a reused row's stale K/V sit at positions its next request writes before reading (its
        banned tokens are set again by a next request that bans any, and read only by one)."""
        assert 0 <= row < self.max_batch
        self.scores.pop(row, None)

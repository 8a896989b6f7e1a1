"""ServerMetrics: Prometheus series for latency and quality per loop count (names as in DESIGN.md).

Every per-request series carries a `loops` label whose values are only the valid loop counts
1..loop_cap. The trained depths 1..max_loops are pre-created at 0, so that dashboards show them before the
first request; deeper valid ones appear when first used (pre-creating all of them made one scrape 200 KB).
Requests rejected before their loop count is known (or with an invalid one) count under
`loops="invalid"` in `requests_total` only. No `_created` series: nothing reads them.

    curl -s 127.0.0.1:8000/metrics | grep '^loopgpt_'
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

PREFIX = "loopgpt"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
NLL_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
ENDPOINTS = ("generate", "completions", "chat")
INVALID = "invalid"


class ServerMetrics:
    def __init__(self, loop_cap: int, evals: dict | None = None, registry: CollectorRegistry | None = None,
                 trained: int | None = None):
        disable_created_metrics()  # prometheus_client's switch is process-wide; it must precede the series
        self.registry = registry or CollectorRegistry()
        self.loop_cap = loop_cap
        self.trained = min(trained or loop_cap, loop_cap)  # depths pre-created at 0
        r, ns = self.registry, PREFIX
        # process_cpu_seconds_total, resident memory, open fds (Linux): `loopgpt loadtest --sweep` reads the CPU
        # seconds before and after each level to report the cores the server used
        ProcessCollector(registry=r)
        per_loops = ["loops"]
        self.requests = Counter("requests", "HTTP requests by endpoint, loops and status code",
                                ["endpoint", "loops", "code"], namespace=ns, registry=r)
        self.success = Counter("request_success", "Finished generations by finish reason",
                               ["loops", "finish_reason"], namespace=ns, registry=r)
        hist = dict(namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("time_to_first_token_seconds", "Arrival to first token", per_loops, **hist)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive tokens", per_loops, **hist)
        self.e2e = Histogram("e2e_request_latency_seconds", "Arrival to last event", per_loops, **hist)
        self.queue = Histogram("queue_time_seconds", "Arrival to admission into the batch", per_loops, **hist)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens prefilled", per_loops, namespace=ns, registry=r)
        self.gen_tokens = Counter("generation_tokens", "Tokens generated", per_loops, namespace=ns, registry=r)
        self.running = Gauge("requests_running", "Requests in the decode batch", namespace=ns, registry=r)
        self.waiting = Gauge("requests_waiting", "Requests waiting for a batch row", namespace=ns, registry=r)
        # A separate family, so that `loopgpt_requests_waiting` (what KEDA and the gateway scale on) stays one
        # unlabelled series; a priority's series exists while requests of it wait (at most --max-queue of them).
        self.waiting_priority = Gauge("requests_waiting_by_priority", "Requests waiting for a batch row, by their "
                                      "priority (lower is admitted first)", ["priority"], namespace=ns, registry=r)
        self.priorities: set[int] = set()
        self.batch_size = Gauge("batch_size", "Rows in the last decode step", namespace=ns, registry=r)
        self.kv_usage = Gauge("kv_cache_usage_ratio", "Fraction of KV-cache positions in use", namespace=ns,
                              registry=r)
        # Prompt tokens, as vLLM counts them: hits / queries is the fraction of prompt tokens not prefilled again
        self.prefix_queries = Counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      namespace=ns, registry=r)
        self.prefix_hits = Counter("prefix_cache_hits", "Prompt tokens served from the prefix cache", namespace=ns,
                                   registry=r)
        self.prefix_usage = Gauge("prefix_cache_usage_ratio", "Fraction of --prefix-cache-mb in use", namespace=ns,
                                  registry=r)
        q = dict(namespace=ns, registry=r, buckets=NLL_BUCKETS)
        self.token_nll = Histogram("token_nll", "NLL (nats) of each generated token under the model", per_loops, **q)
        self.token_entropy = Histogram("token_entropy", "Entropy (nats) of the model's next-token distribution",
                                       per_loops, **q)
        self.prompt_nll = Histogram("prompt_nll", "Mean NLL (nats) of a prompt's own tokens at the request's loops",
                                    per_loops, **q)
        self.loops_per_token = Histogram("loops_per_token", "Loops each decoded token ran, by mode (fixed: the "
                                         "request's loops; auto: until its state converged)", ["mode"],
                                         namespace=ns, registry=r, buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16, 24))
        self.engine_seconds = Counter("engine_seconds", "Engine thread time per phase of its turns: schedule (host), "
                                      "run (the model on a CPU; launches on a GPU), postprocess (detokenize, "
                                      "stream, metrics)", ["phase"], namespace=ns, registry=r)
        # With the engine in its own process (`--engine process`) its CPU time is not in process_cpu_seconds_total:
        # the two together are the server's CPU use.
        self.engine_cpu = Counter("engine_cpu_seconds", "CPU seconds of the engine process, its model threads "
                                  "included (0 with --engine thread, whose time is in process_cpu_seconds_total)",
                                  namespace=ns, registry=r)
        self.drafts = Counter("speculative_drafts", "Self-speculative drafts verified, by outcome",
                              ["loops", "accepted"], namespace=ns, registry=r)
        self.eval_loss = Gauge("checkpoint_eval_loss", "Held-out loss from the checkpoint's eval.json", per_loops,
                               namespace=ns, registry=r)
        self._precreate()
        for loops, row in ((evals or {}).get("loops") or {}).items():
            if str(loops).isdigit() and 1 <= int(loops) <= loop_cap and "loss" in row:
                self.eval_loss.labels(str(int(loops))).set(float(row["loss"]))

    def _precreate(self) -> None:
        for n in range(1, self.trained + 1):
            loops = str(n)
            for endpoint in ENDPOINTS:
                self.requests.labels(endpoint, loops, "200")
            for reason in FINISH_REASONS:
                self.success.labels(loops, reason)
            for series in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.gen_tokens,
                           self.token_nll, self.token_entropy, self.prompt_nll):
                series.labels(loops)

    def loops_label(self, loops: Any) -> str:
        if loops == "auto":
            return "auto"
        return str(loops) if isinstance(loops, int) and 1 <= loops <= self.loop_cap else INVALID

    @staticmethod
    def label(req: Any) -> str:
        """A request's `loops` label: its loop count, or "auto" for an adaptive one."""
        return "auto" if getattr(req, "adaptive", None) is not None else str(req.loops)

    def request(self, endpoint: str, loops: Any, code: int) -> None:
        self.requests.labels(endpoint, self.loops_label(loops), str(code)).inc()

    # ---- engine hooks (engine thread) ----

    def queued(self, req: Any, seconds: float) -> None:
        self.queue.labels(self.label(req)).observe(seconds)
        self.prompt_tokens.labels(self.label(req)).inc(len(req.prompt_ids))

    def prompt_scored(self, req: Any, nll: float) -> None:
        self.prompt_nll.labels(self.label(req)).observe(nll)

    def token(self, req: Any, ttft: float | None, itl: float | None, nll: float, entropy: float) -> None:
        loops = self.label(req)
        if ttft is not None:
            self.ttft.labels(loops).observe(ttft)
        if itl is not None:
            self.itl.labels(loops).observe(itl)
        self.token_nll.labels(loops).observe(nll)
        if entropy == entropy:  # NaN: not computed for this token (sampled on a CPU, server/engine/runner.py)
            self.token_entropy.labels(loops).observe(entropy)

    def looped(self, req: Any, loops: int) -> None:
        self.loops_per_token.labels("auto" if getattr(req, "adaptive", None) else "fixed").observe(loops)

    def engine_cpu_time(self, seconds: float) -> None:
        self.engine_cpu.inc(seconds)

    def engine_time(self, phase: str, seconds: float) -> None:
        self.engine_seconds.labels(phase).inc(seconds)

    def speculated(self, req: Any, accepted: bool) -> None:
        self.drafts.labels(self.label(req), "true" if accepted else "false").inc()

    def batch(self, rows: int) -> None:
        self.batch_size.set(rows)

    def finished(self, req: Any, ev: Any) -> None:
        loops = self.label(req)
        self.success.labels(loops, ev.finish_reason).inc()
        self.e2e.labels(loops).observe(ev.e2e_s)
        self.gen_tokens.labels(loops).inc(ev.completion_tokens)

    def prefix_cache_query(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def gauges(self, running: int, waiting: int, kv_usage: float, prefix_usage: float | None = None) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        if prefix_usage is not None:
            self.prefix_usage.set(prefix_usage)
        if running == 0:
            self.batch_size.set(0)

    def waiting_priorities(self, counts: dict[int, int]) -> None:
        for gone in self.priorities - counts.keys():
            self.waiting_priority.remove(str(gone))
        for priority, n in counts.items():
            self.waiting_priority.labels(str(priority)).set(n)
        self.priorities = set(counts)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Per-request records and their aggregation into per-loops latency, throughput and quality numbers.

Pure functions only (no I/O), so the arithmetic is tested on synthetic streams.

    python -c "from loopgpt.loadtest.stats import percentile; print(percentile([1, 2, 3, 4], 50))"
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request did, as the client saw it; times in seconds."""

    loops: int
    start: float  # when it was sent, seconds after the run started
    status: int = 0  # HTTP status; 0 means the request never got one (connection error, timeout)
    ttft: float | None = None  # send -> first token event
    itls: list[float] = field(default_factory=list)  # gaps between consecutive token events
    e2e: float | None = None  # send -> last byte of the stream
    tokens: int = 0  # completion tokens (the server's usage when given, else token events seen)
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # the server's error message, or the transport error
    prompt_nll: float | None = None  # mean NLL of the prompt tokens, from the final event
    token_nll: float | None = None  # mean NLL of the sampled tokens, from the final event
    url: str | None = None  # the base URL it was sent to (one of several with a multi-URL load)
    replica: str | None = None  # the server's `x-loopgpt-replica` header: who behind a router served it

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def spread(values: list[float]) -> dict:
    """p50/p90/p99 of a sample, keyed "p50" ...; None entries when the sample is empty."""
    return {f"p{q}": percentile(values, q) for q in PERCENTILES}


def summarize(records: list[RequestRecord], duration: float) -> dict:
    """Latency percentiles, rates, errors and mean quality of one group of requests.

    `duration` is the wall time of the whole run: request and token rates are per run second, so
    the per-loops rows add up to the overall row.
    """
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = str(r.status) if r.status else "transport"
            errors[key] = errors.get(key, 0) + 1
    tokens = sum(r.tokens for r in ok)
    decode_rates = [(r.tokens - 1) / (r.e2e - r.ttft) for r in ok
                    if r.tokens > 1 and r.e2e is not None and r.ttft is not None and r.e2e > r.ttft]
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": errors,
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "finish_reasons": finish,
        "ttft_s": spread([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": spread([gap for r in ok for gap in r.itls]),
        "e2e_s": spread([r.e2e for r in ok if r.e2e is not None]),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / duration if duration > 0 else None,  # aggregate, over the run
        "stream_tokens_per_s": mean(decode_rates),  # per request, after its first token
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "prompt_nll": mean([r.prompt_nll for r in ok if r.prompt_nll is not None]),
        "token_nll": mean([r.token_nll for r in ok if r.token_nll is not None]),
    }


def summarize_by_loops(records: list[RequestRecord], duration: float) -> dict:
    """{"by_loops": {loops: summary}, "overall": summary, "by_replica": {...}}, loops in ascending order."""
    groups: dict[int, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.loops, []).append(r)
    return {
        "by_loops": {n: summarize(groups[n], duration) for n in sorted(groups)},
        "overall": summarize(records, duration),
        "by_replica": by_replica(records, duration),
    }


def by_replica(records: list[RequestRecord], duration: float) -> dict:
    """Requests, successes and tokens per serving replica (its `x-loopgpt-replica` header, else the URL it was
    sent to when there were several); {} when the run cannot tell replicas apart."""
    urls = {r.url for r in records}
    if not any(r.replica for r in records) and len(urls) < 2:
        return {}
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.replica or (r.url if len(urls) > 1 else None) or UNNAMED, []).append(r)
    out = {}
    for name in sorted(groups):
        ok = [r for r in groups[name] if r.ok]
        tokens = sum(r.tokens for r in ok)
        out[name] = {"requests": len(groups[name]), "ok": len(ok), "completion_tokens": tokens,
                     "tokens_per_s": tokens / duration if duration > 0 else None}
    return out


UNNAMED = "(no replica header)"  # failed before any response, or a server that does not name itself

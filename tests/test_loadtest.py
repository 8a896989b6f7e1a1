"""Tests of the load generator: statistics on synthetic streams, and the client against a stub SSE server.

The stub server (uvicorn on 127.0.0.1, a free port) speaks DESIGN.md's /generate streaming contract;
it is a test double for the client only. The end-to-end test against `loopgpt serve` is further down.

    python -m pytest tests/test_loadtest.py -q
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from loopgpt.loadtest.runner import LoadConfig, arrival_times, load_prompts, parse_loops_mix, run_load
from loopgpt.loadtest.stats import RequestRecord, percentile, summarize, summarize_by_loops
from server_harness import free_port
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loopgpt.cli import main

BUSY_LOOPS = 3  # the stub answers 429 to every request for this many loops


# ---------------------------------------------------------------- statistics (pure functions)

@pytest.mark.parametrize("n", [1, 2, 5, 101])
def test_percentile_matches_numpy(n):
    xs = list(np.random.default_rng(n).exponential(size=n))
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def synthetic(loops: int, i: int) -> RequestRecord:
    """Request i of a made-up stream: TTFT i ms, 4 tokens 10 ms apart, NLLs that depend on loops."""
    ttft = i / 1000
    return RequestRecord(loops=loops, start=i, status=200, ttft=ttft, itls=[0.01] * 3, e2e=ttft + 0.03, tokens=4,
                         finish_reason="length", prompt_nll=float(loops), token_nll=1.0 / loops)


def test_summary_of_a_synthetic_stream():
    records = [synthetic(1, i) for i in range(1, 101)] + [synthetic(2, i) for i in range(1, 51)]
    records += [RequestRecord(loops=2, start=0, status=429, error="queue full")] * 5
    records += [RequestRecord(loops=1, start=0, status=0, error="ConnectError")] * 2
    s = summarize_by_loops(records, duration=10.0)
    one, two, overall = s["by_loops"][1], s["by_loops"][2], s["overall"]
    assert list(s["by_loops"]) == [1, 2]
    assert (one["requests"], one["ok"], one["errors"]) == (102, 100, {"transport": 2})
    assert (two["requests"], two["ok"], two["errors"]) == (55, 50, {"429": 5})
    assert overall["errors"] == {"429": 5, "transport": 2} and overall["error_rate"] == pytest.approx(7 / 157)
    assert one["ttft_s"]["p50"] == pytest.approx(0.0505) and one["ttft_s"]["p99"] == pytest.approx(0.09901)
    assert two["ttft_s"]["p90"] == pytest.approx(0.0451)
    assert one["itl_s"] == {"p50": pytest.approx(0.01), "p90": pytest.approx(0.01), "p99": pytest.approx(0.01)}
    assert one["e2e_s"]["p50"] == pytest.approx(0.0805)
    assert one["stream_tokens_per_s"] == pytest.approx(100.0)  # 3 tokens after the first, in 30 ms
    assert (one["prompt_nll"], one["token_nll"], two["token_nll"]) == (1.0, 1.0, 0.5)
    # rates are per run second, so the per-loops rows add up to the overall row
    assert one["tokens_per_s"] + two["tokens_per_s"] == pytest.approx(overall["tokens_per_s"]) == 60.0
    assert one["requests_per_s"] + two["requests_per_s"] == pytest.approx(overall["requests_per_s"]) == 15.0
    assert summarize([], 1.0)["ttft_s"]["p50"] is None


def test_loops_mix_and_prompts_file(tmp_path):
    assert parse_loops_mix("1,2,4,6") == {1: 1.0, 2: 1.0, 4: 1.0, 6: 1.0}
    assert parse_loops_mix("1:3, 6:1") == {1: 3.0, 6: 1.0}
    for bad in ("", "0", "a", "2:0", "1:-1"):
        with pytest.raises(ValueError):
            parse_loops_mix(bad)
    f = tmp_path / "p.txt"
    f.write_text("First story.\n\nSecond\nstory.\n\n\n", encoding="utf-8")
    assert load_prompts(f) == ["First story.", "Second\nstory."]
    f.write_text("a b<|endoftext|>\n\nc d<|endoftext|>", encoding="utf-8")
    assert load_prompts(f, max_chars=3) == ["a b", "c d"]
    with pytest.raises(ValueError, match="cannot read prompts file"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--requests or --duration"):
        LoadConfig(url="http://x")


# ---------------------------------------------------------------- a stub SSE server on 127.0.0.1

class Stub:
    """/generate: 429 for BUSY_LOOPS, otherwise max_tokens events `gap` seconds apart; logs arrivals."""

    def __init__(self, gap: float):
        self.gap = gap
        self.arrivals: list[float] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def generate(self, request: Request):
        self.arrivals.append(time.perf_counter())
        self.auth.append(request.headers.get("authorization"))
        loops = int(request.query_params["loops"])
        body = await request.json()
        if loops == BUSY_LOOPS:
            error = {"message": "queue is full; retry later", "type": "rate_limit", "param": None, "code": 429}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "1"})
        n = body["max_tokens"]

        async def events():
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                for i in range(n):
                    await asyncio.sleep(self.gap)
                    yield json.dumps({"text": f" t{i}", "token_id": i, "index": i})
                yield json.dumps({"finish_reason": "length", "usage": {"prompt_tokens": 5, "completion_tokens": n},
                                  "timing": {}, "loops": loops,
                                  "quality": {"prompt_nll": float(loops), "token_nll": 1.0 / loops}})
                yield "[DONE]"
            finally:
                self.in_flight -= 1

        return EventSourceResponse(events())


@pytest.fixture()
def stub():
    """A fresh stub server per test: (base URL, Stub)."""
    state = Stub(gap=0.005)
    app = Starlette(routes=[Route("/generate", state.generate, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_closed_loop_counts_add_up_and_429_is_counted(stub):
    url, state = stub
    cfg = LoadConfig(url=url, loops_mix={1: 1, BUSY_LOOPS: 1, 4: 1}, max_tokens=6, concurrency=4, requests=30,
                     progress=False)
    records, duration = asyncio.run(run_load(cfg))
    assert len(records) == len(state.arrivals) == 30  # exactly --requests, none lost, none extra
    s = summarize_by_loops(records, duration)
    assert sum(row["requests"] for row in s["by_loops"].values()) == 30
    busy = s["by_loops"][BUSY_LOOPS]
    assert busy["ok"] == 0 and busy["errors"] == {"429": busy["requests"]} and busy["requests"] > 0
    assert all(r.error == "queue is full; retry later" for r in records if r.status == 429)
    for n in (1, 4):
        row = s["by_loops"][n]
        assert row["ok"] == row["requests"] > 0 and row["completion_tokens"] == 6 * row["ok"]
        assert (row["prompt_nll"], row["token_nll"]) == (float(n), 1.0 / n)
        assert row["finish_reasons"] == {"length": row["ok"]}
    for r in records:
        if r.ok:
            assert r.tokens == 6 and len(r.itls) == 5 and 0 < r.ttft <= r.e2e
    assert state.max_in_flight <= 4


def test_open_loop_keeps_its_arrival_rate(stub):
    """Poisson arrivals at 40/s while each request takes ~0.25 s: the rate holds although replies lag.

    Tolerance: the realised rate at the server is within 15% of the seeded plan's own rate, and no
    request starts more than 100 ms after its planned time (the plan itself is deterministic).
    """
    url, state = stub
    state.gap = 0.025  # 10 tokens -> ~0.25 s per request, so a closed loop of 1 would manage ~4/s
    rate, n, seed = 40.0, 60, 7
    cfg = LoadConfig(url=url, rate=rate, requests=n, max_tokens=10, seed=seed, progress=False)
    records, _ = asyncio.run(run_load(cfg))
    planned = [t for t, _ in zip(arrival_times(rate, seed), range(n), strict=False)]
    assert len(records) == len(state.arrivals) == n and all(r.ok for r in records)
    arrivals = sorted(state.arrivals)
    plan_rate = (n - 1) / (planned[-1] - planned[0])
    real_rate = (n - 1) / (arrivals[-1] - arrivals[0])
    assert 0.7 * rate < plan_rate < 1.3 * rate
    assert real_rate == pytest.approx(plan_rate, rel=0.15)
    starts = sorted(r.start for r in records)
    assert max(s - p for s, p in zip(starts, planned, strict=True)) < 0.1
    assert state.max_in_flight >= 4  # open loop: requests overlap instead of waiting for each other


def test_duration_bound_stops_by_itself(stub):
    url, _ = stub
    cfg = LoadConfig(url=url, concurrency=2, duration=0.5, max_tokens=4, progress=False)
    t0 = time.perf_counter()
    records, duration = asyncio.run(run_load(cfg))
    assert time.perf_counter() - t0 < 2.0 and duration < 2.0
    assert len(records) > 2 and all(r.start < 0.5 for r in records)


def test_api_key_is_sent_as_bearer(stub):
    url, state = stub
    asyncio.run(run_load(LoadConfig(url=url, requests=2, max_tokens=2, api_key="sekret", progress=False)))
    asyncio.run(run_load(LoadConfig(url=url, requests=1, max_tokens=2, progress=False)))
    assert state.auth == ["Bearer sekret", "Bearer sekret", None]


def test_unreachable_server_is_counted_not_raised():
    port = free_port()  # a port nobody listens on
    cfg = LoadConfig(url=f"http://127.0.0.1:{port}", requests=3, timeout=5, progress=False)
    records, duration = asyncio.run(run_load(cfg))
    assert [r.status for r in records] == [0, 0, 0] and all("Connect" in r.error for r in records)
    assert summarize(records, duration)["errors"] == {"transport": 3}


def test_cli_loadtest_writes_table_json_and_plot(stub, tmp_path, capsys):
    url, _ = stub
    out, png = tmp_path / "lt.json", tmp_path / "lt.png"
    rc = main(["loadtest", "--url", url, "--concurrency", "3", "--requests", "12", "--loops", "1:2,2:1,3:1",
               "--max-tokens", "5", "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "12 requests" in printed and "errors by status: 429:" in printed
    data = json.loads(out.read_text())
    assert data["overall"]["requests"] == len(data["requests"]) == 12
    assert sum(row["requests"] for row in data["by_loops"].values()) == 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_loadtest_bad_input_is_one_sentence(capsys):
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--requests", "0"]) == 2
    assert "--requests must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end: the real `loopgpt serve`

@pytest.fixture(scope="module")
def real_server(tiny_checkpoint):
    """`loopgpt serve` on the tiny checkpoint, as a subprocess on a free 127.0.0.1 port."""
    from loopgpt.loadtest.bench_http import serve

    # every prompt scored (the default samples a fraction), so that /generate's final event always has prompt_nll
    with serve(str(tiny_checkpoint), max_batch=4, threads=1, timeout=120, flags=("--prompt-nll", "1")) as url:
        yield url


@pytest.mark.parametrize("endpoint", ["generate", "completions"])
def test_loadtest_against_the_real_server(real_server, endpoint):
    bad_loops = 99  # beyond the tiny checkpoint's loop_cap of 16: the server must answer 4xx
    cfg = LoadConfig(url=real_server, loops_mix={1: 2, 4: 2, bad_loops: 1}, max_tokens=8, concurrency=3, requests=15,
                     endpoint=endpoint, progress=False, timeout=60)
    records, duration = asyncio.run(run_load(cfg))
    s = summarize_by_loops(records, duration)
    assert len(records) == 15 and sum(row["requests"] for row in s["by_loops"].values()) == 15
    bad = s["by_loops"][bad_loops]  # seed 0 draws it (the mix is seeded, so this cannot flake)
    assert bad["requests"] > 0 and bad["ok"] == 0 and all(400 <= int(code) < 500 for code in bad["errors"])
    assert all("loops" in r.error for r in records if r.loops == bad_loops)
    for n in (1, 4):
        row = s["by_loops"][n]
        assert row["ok"] == row["requests"] > 0, [r.error for r in records if r.loops == n and not r.ok]
        assert 0 < row["ttft_s"]["p50"] <= row["e2e_s"]["p50"]
        if endpoint == "generate":  # the quality numbers ride on /generate's final event
            assert row["prompt_nll"] > 0 and row["token_nll"] > 0
    for r in records:
        if r.ok:
            assert 1 <= r.tokens <= 8 and r.finish_reason in ("stop", "length")
            assert len(r.itls) <= r.tokens - 1


def test_bench_engine_rows_write_ratios(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--rows", "1,2,6,7,8,9,10", "--reps", "2", "--tokens",
                 "6", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {1, 2, 6, 7, 8, 9, 10} and data["tokens"] == 6 and data["machine"]["threads"] == 1
    for n in (1, 2, 7, 10):
        assert len(rows[n]["ours"]) == len(rows[n]["base"]) == 2 and rows[n]["ratio"] > 0
        ours, base = rows[n]["ours_median"], rows[n]["base_median"]
        assert rows[n]["ratio"] == pytest.approx(base / ours if n in (7, 10) else ours / base)  # >1: faster
    assert "no KV cache" in " ".join(rows[1]["extra"]) and rows[6]["skipped"]
    assert {"8 rows, tok/s", "16 rows, tok/s", "32 rows, tok/s"} <= set(rows[2]["extra"])
    assert len(rows[8]["extra"]) == 3
    assert rows[9]["ratio"] > 0 and rows[9]["extra"]["greedy output identical to plain"] == "yes"
    prefix = json.loads((tiny_checkpoint / "config.json").read_text())["block_size"] * 3 // 4
    assert rows[10]["extra"]["cached tokens per request (ours)"] == [prefix // 16 * 16]  # the whole prefix's blocks
    assert "decode batch 1" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_http_and_onnx_rows(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--rows", "3,4,5", "--reps", "1", "--tokens", "6",
                 "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[3]["extra"]["failed requests"] == 0 and rows[4]["extra"]["failed requests"] == 0
    assert rows[3]["ratio"] > 0 and rows[4]["ratio"] > 0
    assert rows[5]["skipped"] or rows[5]["ratio"] > 0


def test_bench_bad_rows_is_one_sentence(tiny_checkpoint, capsys):
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--rows", "1,x"]) == 2
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--rows", "11"]) == 2
    err = capsys.readouterr().err
    assert "--rows takes numbers 1..10" in err and err.count("\n") == 2

"""Observability: /metrics after a mixed-loops load, a real Prometheus running every dashboard query,
and the quality sanity check on the demo checkpoint.

    python -m pytest tests/test_server_metrics.py -q
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time

import httpx
import pytest
from conftest import HELDOUT, ROOT, needs_heldout
from loopgpt.model import SamplingParams, load_checkpoint
from loopgpt.model.step import OUT_FIELDS
from loopgpt.server.engine import ModelRunner, PrefillChunk, Sample, StepPlan
from server_harness import free_port, post, running_server, samples

DASHBOARD = ROOT / "deploy" / "grafana" / "loopgpt.json"
LOAD = {1: 3, 2: 2, 4: 2, 16: 1}  # loops -> requests: a mixed-loops load, one depth beyond the trained ones
LOOP_CAP = 16
TRAINED = 4  # the tiny checkpoint's max_loops: depths 1..4 are pre-created, deeper ones appear when used


def send_load(url: str) -> dict[int, int]:
    """LOAD's requests over both endpoints and both modes, plus 3 rejected ones; completion tokens per loops."""
    tokens = dict.fromkeys(LOAD, 0)
    for loops, n in LOAD.items():
        for i in range(n):
            if i % 2:
                r = post(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6, "loops": loops})
                tokens[loops] += r.json()["usage"]["completion_tokens"]
            else:
                r = post(url, f"/generate?loops={loops}", {"prompt": "She loved to play", "max_tokens": 5})
                tokens[loops] += r.json()["usage"]["completion_tokens"]
            assert r.status_code == 200
    assert post(url, "/generate?loops=99", {"prompt": "hi"}).status_code == 400
    assert post(url, "/generate?loops=2", {"prompt": "hi", "top_p": 7}).status_code == 400
    assert post(url, "/v1/completions", {"prompt": ""}).status_code == 400
    return tokens


def value(metrics: dict, name: str, **labels) -> float:
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=4, prompt_nll=1.0) as (url, _):
        yield url


def test_metrics_after_mixed_load(server):
    tokens = send_load(server)
    m = samples(server)
    valid = {str(n) for n in range(1, LOOP_CAP + 1)}
    for name, rows in m.items():
        for labels, _ in rows:
            if "loops" in labels:
                requests = name == "loopgpt_requests_total"
                allowed = valid | {"invalid"} if requests else valid
                assert labels["loops"] in allowed, (name, labels)
    for loops, n in LOAD.items():
        lab = str(loops)
        assert value(m, "loopgpt_requests_total", loops=lab, code="200") == n
        assert value(m, "loopgpt_request_success_total", loops=lab) == n
        assert value(m, "loopgpt_time_to_first_token_seconds_count", loops=lab) == n
        assert value(m, "loopgpt_e2e_request_latency_seconds_count", loops=lab) == n
        assert value(m, "loopgpt_queue_time_seconds_count", loops=lab) == n
        assert value(m, "loopgpt_prompt_nll_count", loops=lab) == n
        assert value(m, "loopgpt_generation_tokens_total", loops=lab) == tokens[loops]
        sampled = value(m, "loopgpt_token_nll_count", loops=lab)  # completion tokens, plus an EOS if one came
        assert tokens[loops] <= sampled <= tokens[loops] + n
        assert value(m, "loopgpt_inter_token_latency_seconds_count", loops=lab) == sampled - n
    assert value(m, "loopgpt_requests_total", code="400") == 3
    assert value(m, "loopgpt_requests_total", loops="2", code="400") == 1  # bad top_p, loops known from the query
    assert value(m, "loopgpt_requests_total", loops="invalid", code="400") == 1  # loops=99 is not a label value
    # Pre-created at 0 for a trained depth nobody asked for; an untrained unused depth is not there at all.
    assert ({"loops": "3"}, 0.0) in m["loopgpt_generation_tokens_total"]
    assert value(m, "loopgpt_time_to_first_token_seconds_bucket", loops="3", le="0.001") == 0
    assert not [lab for lab, _ in m["loopgpt_time_to_first_token_seconds_count"] if lab["loops"] == "9"]
    assert not [name for name in m if name.endswith("_created")]  # prometheus_client's _created series are off
    assert min(float(lab["le"]) for lab, _ in m["loopgpt_time_to_first_token_seconds_bucket"]) == 0.001
    assert value(m, "loopgpt_checkpoint_eval_loss", loops="1") == pytest.approx(5.9)
    assert value(m, "loopgpt_checkpoint_eval_loss", loops="4") == pytest.approx(5.6)
    assert value(m, "loopgpt_requests_running") == 0 and value(m, "loopgpt_requests_waiting") == 0


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel of the Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus binary is missing in CI (.ci/run installs the Debian package)")
        pytest.skip("no prometheus binary (apt-get install prometheus); CI runs this test")
    return path


def query(prom: str, promql: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def wait_for(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_real_prometheus_runs_every_dashboard_query(tiny_checkpoint, tmp_path):
    binary = prometheus_binary()
    with running_server(tiny_checkpoint, max_batch=4, prompt_nll=1.0) as (url, _):
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: loopgpt, static_configs: [{{targets: ['{url[len('http://'):]}']}}]}}]\n"
        )
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        prom = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: [s for s in _safe_query(prom, 'up{job="loopgpt"}') if s["value"][1] == "1"],
                     "Prometheus to scrape the server")
            send_load(url)
            time.sleep(2.5)  # two more scrapes, so every rate() sees the load
            for title, promql in dashboard_queries():
                per_loops = "loops" in promql and "by (" in promql and "loops" in promql.split("by (")[1]
                # A depth beyond the trained ones is created by its first request, and rate() cannot see the
                # first increment of a new series (a Prometheus property): only the trained depths are needed.
                need = {str(n) for n in LOAD if n <= TRAINED} if per_loops else set()
                if "eval_loss" in promql:
                    need = {"1", "2", "3", "4"}  # the tiny checkpoint's eval.json

                def answered(promql=promql, need=need):
                    result = _safe_query(prom, promql)
                    finite = {s["metric"].get("loops") for s in result if math.isfinite(float(s["value"][1]))}
                    return result if result and need <= finite else None

                wait_for(answered, f"data for panel {title!r}: {promql}", timeout=20)
        finally:
            proc.terminate()
            proc.wait(20)


def _safe_query(prom: str, promql: str) -> list:
    try:
        return query(prom, promql)
    except httpx.TransportError:
        return []


DEMO = ROOT / "checkpoints" / "demo"


@needs_heldout
def test_prompt_nll_is_lower_at_max_loops_than_at_one_on_the_demo_checkpoint():
    if not (DEMO / "config.json").is_file():
        pytest.skip("checkpoints/demo is not there yet (the training issue ships it)")
    model, tokenizer, _ = load_checkpoint(DEMO)
    stories = HELDOUT.read_text(encoding="utf-8").split("\n\n")[:40]
    prompts = [ids[:128] for ids in (tokenizer.encode(s.strip()) for s in stories) if len(ids) >= 16]
    assert len(prompts) >= 10, "not enough held-out-like prompts"
    runner = ModelRunner(model, max_batch=1)
    with runner.context():
        def prompt_nll(p: list[int], loops: int) -> float:  # what the engine reports for a request's prompt
            lane = runner.lane(0, len(p) - 1)
            plan = StepPlan(prefill=[PrefillChunk(0, p, 0, loops, p[1:])],
                            samples=[Sample(lane, lane, 0, SamplingParams(0), 0, 0)])
            return runner.run(plan).result()[0][OUT_FIELDS.index("prompt_nll")] / (len(p) - 1)

        def mean_nll(loops: int) -> float:
            return sum(prompt_nll(p, loops) for p in prompts) / len(prompts)

        shallow, deep = mean_nll(1), mean_nll(model.config.max_loops)
    assert deep < shallow, f"prompt NLL at {model.config.max_loops} loops {deep:.3f} >= at 1 loop {shallow:.3f}"

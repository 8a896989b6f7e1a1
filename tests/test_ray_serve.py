"""Ray Serve replicas, for real: a local Ray cluster (loopback only) with 2 replicas of the demo checkpoint,
one torch thread each, behind Ray's HTTP proxy.

- 40 concurrent streams through the proxy all succeed and both replicas serve some; each replica's own
  metrics endpoint (announced as a Prometheus file_sd target) carries a `replica` label, and a real
  Prometheus scraping those targets sees both replicas.
- One replica's process is SIGKILLed mid-load (16 streams at a time, 40 in all): only requests on that
  replica may fail (and they end, never hang), the survivor's all succeed and it takes the requests sent
  after the kill, and Ray starts a replacement. The failed count is printed.
- Scale-down from 2 replicas to 1 drains: streams on the replica being removed run to their end.

    python -m pytest tests/test_ray_serve.py -q -s      # ~1-2 min on 2 cores; -s shows the failed count
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from loopgpt.loadtest.runner import LoadConfig, run_load
from loopgpt.loadtest.stats import RequestRecord, summarize_by_loops
from server_harness import free_port, samples, sse_events
from test_server_metrics import prometheus_binary, query, wait_for

# conftest.py keeps the cluster on loopback: nothing of this test listens on, or talks to, another address.
if os.environ.get("CI") == "true":
    import ray  # the dev extra installs it: in CI a missing Ray is a failure, not a skip
else:
    ray = pytest.importorskip("ray", reason='Ray Serve is not installed (pip install -e ".[ray]")')
from loopgpt.server.ray_serve import APP_NAME, DEPLOYMENT, STALE_S, ReplicaSettings, application  # noqa: E402
from loopgpt.server.scaling import Scaling  # noqa: E402
from ray import serve  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "checkpoints" / "demo"
GRACE_S = 30.0  # graceful_shutdown_timeout_s: longer than any stream of the drain test


@dataclass
class Cluster:
    url: str
    settings: ReplicaSettings
    sd_dir: Path


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc), so that cleanup can reap what Ray left behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sd_dir = tmp_path_factory.mktemp("prometheus-sd")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ReplicaSettings(checkpoint=str(DEMO), device="cpu", threads=1, metrics_sd_dir=str(sd_dir),
                                   server={"max_batch": 8, "max_queue": 64})
        serve.run(application(settings, Scaling(replicas=2), GRACE_S), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", settings, sd_dir)
    finally:
        left = descendants(os.getpid())
        serve.shutdown()
        ray.shutdown()
        for pid in left & descendants(os.getpid()):  # anything Ray's shutdown did not stop
            os.kill(pid, signal.SIGKILL)


def identities(expect: int, exclude: set[str] = frozenset(), timeout: float = 90.0) -> dict[str, dict]:
    """replica name -> identity of `expect` running replicas (none in `exclude`), asked through Ray's router."""
    handle = serve.get_app_handle(APP_NAME)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < expect:
        assert time.monotonic() < deadline, f"only saw replicas {sorted(seen)} within {timeout:.0f} s"
        who = handle.identity.remote().result(timeout_s=30)
        if who["replica"] not in exclude:
            seen[who["replica"]] = who
        else:
            time.sleep(0.1)
    return seen


def sd_targets(sd_dir: Path) -> dict[str, str]:
    """replica name -> host:port from the file_sd target files the replicas wrote."""
    return {f.stem: json.loads(f.read_text())[0]["targets"][0] for f in sd_dir.glob("*.json")}


def load(url: str, n: int, max_tokens: int, loops: dict[int, float],
         concurrency: int | None = None) -> tuple[list[RequestRecord], float]:
    cfg = LoadConfig(url=url, loops_mix=loops, max_tokens=max_tokens, concurrency=concurrency or n, requests=n,
                     progress=False, timeout=90, temperature=0.8)
    return asyncio.run(run_load(cfg))


def test_40_concurrent_streams_through_the_proxy_reach_both_replicas(cluster):
    records, duration = load(cluster.url, 40, 16, {1: 1, 2: 1, 4: 1})
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    served = summarize_by_loops(records, duration)["by_replica"]
    assert len(served) == 2 and all(s["ok"] > 0 for s in served.values()), served

    targets = sd_targets(cluster.sd_dir)
    assert set(targets) == set(served)  # one Prometheus target per replica, named like its header
    for name, target in targets.items():
        m = samples(f"http://{target}")
        rows = m["loopgpt_request_success_total"]
        assert {labels["replica"] for labels, _ in rows} == {name}
        assert sum(v for _, v in rows) == served[name]["ok"]  # the replica counted exactly what it served
        assert "loopgpt_requests_waiting" in m and "loopgpt_kv_cache_usage_ratio" in m


def test_prometheus_finds_every_replica_through_file_sd(cluster, tmp_path):
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: loopgpt-replicas\n"
                      f"    file_sd_configs: [{{files: ['{cluster.sd_dir}/*.json'], refresh_interval: 1s}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    prom = f"http://127.0.0.1:{port}"

    def both() -> list:
        try:
            if httpx.get(f"{prom}/-/ready", timeout=5).status_code != 200:  # 503 while it opens its storage
                return []
            return [s for s in query(prom, "count by (replica) (loopgpt_requests_waiting)")]
        except httpx.TransportError:
            return []

    try:
        wait_for(lambda: len(both()) == 2, "Prometheus to scrape both replicas", timeout=30)
        assert {s["metric"]["replica"] for s in both()} == set(sd_targets(cluster.sd_dir))
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_killed_replica_fails_only_its_own_requests_and_is_replaced(cluster, capsys):
    before = identities(2)
    victim, survivor = sorted(before)
    target = before[victim]["metrics"]

    def first_tokens() -> float:  # requests that have started streaming on the victim, ever
        return sum(v for _, v in samples(f"http://{target}").get("loopgpt_time_to_first_token_seconds_count", []))

    started = first_tokens()
    result: list = []
    # 16 streams at a time, 40 in all: the ones sent after the kill show the survivor taking the load.
    runner = threading.Thread(target=lambda: result.append(load(cluster.url, 40, 96, {4: 1}, 16)), daemon=True)
    runner.start()
    # Kill once streams of this load run there; 96 tokens at 4 loops keep them in flight a while.
    wait_for(lambda: first_tokens() >= started + 2, "requests to start streaming on the replica to be killed",
             timeout=60)
    os.kill(before[victim]["pid"], signal.SIGKILL)
    runner.join(150)
    assert not runner.is_alive(), "the load did not end: a request hung after the replica was killed"
    records, duration = result[0]
    failed = [r for r in records if not r.ok]
    with capsys.disabled():
        print(f"\n[ray kill test] {len(records)} requests, {len(failed)} failed (all on the killed replica "
              f"{victim}); survivor {survivor} served {sum(r.replica == survivor for r in records)}; "
              f"{duration:.1f} s; errors: {sorted({(r.status, (r.error or '')[:80]) for r in failed})}")
    assert len(records) == 40
    assert all(r.ok for r in records if r.replica == survivor)
    # Only the killed replica's requests may fail: in flight there (named by its header), or sent to it before
    # Ray knew it was gone (no response at all). Each ended with an error, none by our 90 s client timeout.
    assert all(r.replica in (victim, None) for r in failed), [(r.replica, r.error) for r in failed]
    assert not [r for r in failed if "Timeout" in (r.error or "")], [r.error for r in failed]
    assert any(r.ok for r in records if r.replica == survivor)

    after = identities(2, exclude={victim})  # Ray replaced the dead replica with a new one
    assert survivor in after and victim not in after
    again, _ = load(cluster.url, 4, 4, {1: 1})
    assert all(r.ok for r in again), [r.error for r in again if not r.ok]


def test_scale_down_drains_the_streams_of_the_removed_replica(cluster):
    names = set(identities(2))

    def stream(i: int) -> tuple[str, list]:
        body = {"prompt": "Once upon a time", "max_tokens": 40, "loops": 4, "seed": i, "stream": True}
        with httpx.stream("POST", f"{cluster.url}/generate", json=body, timeout=90) as r:
            assert r.status_code == 200
            return r.headers["x-loopgpt-replica"], list(sse_events(r.iter_lines()))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        time.sleep(1.0)  # all six admitted and streaming
        serve.run(application(cluster.settings, Scaling(replicas=1), GRACE_S), name=APP_NAME, route_prefix="/")
        results = [f.result(timeout=120) for f in futures]
    assert {name for name, _ in results} == names  # the removed replica had streams in flight
    for _, events in results:
        final = events[-2]
        assert events[-1] == "[DONE]" and final["finish_reason"] in ("length", "stop"), final

    # The removed replica finishes draining, then withdraws its metrics target; the target file of the replica
    # killed above is pruned once it goes stale (nobody rewrites it).
    deadline = time.monotonic() + GRACE_S + STALE_S + 10
    while True:
        states = serve.status().applications[APP_NAME].deployments[DEPLOYMENT].replica_states
        targets = sd_targets(cluster.sd_dir)
        if states == {"RUNNING": 1} and len(targets) == 1:
            break
        assert time.monotonic() < deadline, f"replicas {states}, metrics targets {targets}"
        time.sleep(0.5)

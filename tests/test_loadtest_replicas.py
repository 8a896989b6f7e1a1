"""Load testing several replicas: `--url` given twice spreads requests round-robin, each response names its
replica (`x-loopgpt-replica`), and the report counts requests and tokens per replica.

    python -m pytest tests/test_loadtest_replicas.py -q
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from loopgpt.loadtest.runner import LoadConfig, run_load
from loopgpt.loadtest.stats import summarize_by_loops
from server_harness import running_server

from loopgpt.cli import main


@pytest.fixture(scope="module")
def two_replicas(tiny_checkpoint):
    """Two real servers on the tiny checkpoint, named replica-a and replica-b: (url_a, url_b)."""
    with running_server(tiny_checkpoint, max_batch=4, replica_name="replica-a") as (a, _), \
            running_server(tiny_checkpoint, max_batch=4, replica_name="replica-b") as (b, _):
        yield a, b


def test_every_response_names_its_replica(two_replicas):
    a, b = two_replicas
    assert httpx.get(f"{a}/health", timeout=10).headers["x-loopgpt-replica"] == "replica-a"
    bad = httpx.post(f"{b}/generate?loops=99", json={"prompt": "hi"}, timeout=10)  # errors are named too
    assert bad.status_code == 400 and bad.headers["x-loopgpt-replica"] == "replica-b"
    with httpx.stream("POST", f"{b}/generate", json={"prompt": "Once", "max_tokens": 3, "stream": True},
                      timeout=30) as r:
        assert r.headers["x-loopgpt-replica"] == "replica-b"
        assert "[DONE]" in r.read().decode()


def test_several_urls_are_loaded_round_robin_and_counted_per_replica(two_replicas):
    a, b = two_replicas
    cfg = LoadConfig(url=f"{a},{b}", loops_mix={1: 1, 3: 1}, max_tokens=5, concurrency=4, requests=12,
                     progress=False, timeout=60)
    records, duration = asyncio.run(run_load(cfg))
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    assert {(r.url, r.replica) for r in records} == {(a, "replica-a"), (b, "replica-b")}
    per = summarize_by_loops(records, duration)["by_replica"]
    assert set(per) == {"replica-a", "replica-b"}
    assert per["replica-a"]["requests"] == per["replica-b"]["requests"] == 6  # strictly alternating
    assert sum(p["completion_tokens"] for p in per.values()) == sum(r.tokens for r in records)


def test_cli_prints_and_writes_the_per_replica_counts(two_replicas, tmp_path, capsys):
    a, b = two_replicas
    out = tmp_path / "lt.json"
    rc = main(["loadtest", "--url", a, "--url", b, "--requests", "4", "--concurrency", "2", "--max-tokens", "3",
               "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "replica-a" in printed and "replica-b" in printed
    assert {k: v["requests"] for k, v in json.loads(out.read_text())["by_replica"].items()} == {
        "replica-a": 2, "replica-b": 2}


def test_one_unnamed_server_has_no_replica_table(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=2) as (url, _):
        assert "x-loopgpt-replica" not in httpx.get(f"{url}/health", timeout=10).headers
        records, duration = asyncio.run(run_load(LoadConfig(url=url, requests=2, max_tokens=2, progress=False)))
    assert summarize_by_loops(records, duration)["by_replica"] == {}


def test_a_url_that_is_not_http_is_one_sentence(capsys):
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--url", "127.0.0.1:10", "--requests", "1"]) == 2
    assert "--url takes http(s) base URLs" in capsys.readouterr().err

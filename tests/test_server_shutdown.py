"""`loopgpt serve` as a real process: SIGTERM drains (streams keep going for the grace period, then end
with finish_reason "abort"), no new work is admitted, and the process exits 0.

    python -m pytest tests/test_server_shutdown.py -q
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest
from server_harness import make_long_checkpoint, serve_process, sse_events

GRACE_S = 1.5


@pytest.fixture
def served(tmp_path_factory, bpe):
    ckpt = make_long_checkpoint(tmp_path_factory.mktemp("long-ckpt"), bpe)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(log, "--checkpoint", str(ckpt), "--device", "cpu", "--max-batch", "2", "--shutdown-grace",
                       str(GRACE_S), "--log-level", "warning", timeout_s=90) as (url, proc):
        yield proc, url, log


def refused(url: str, body: dict) -> bool:
    """Not admitted: the listening socket is closed, or the server answers 503."""
    try:
        return httpx.post(f"{url}/generate", json=body, timeout=5).status_code == 503
    except httpx.TransportError:
        return True


@pytest.mark.slow  # a server process, a 900-token stream and a drain
def test_sigterm_drains_then_aborts_and_exits_0(served):
    proc, url, log = served
    body = {"prompt": "Once upon a time", "max_tokens": 900, "loops": 16, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
        events = sse_events(r.iter_lines())
        before = [next(events), next(events)]
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        assert refused(url, body), "a new request was admitted while draining"
        rest = list(events)
        ended = time.monotonic()
    assert [e["index"] for e in before] == [0, 1]
    assert rest[-1] == "[DONE]"
    final = rest[-2]
    assert final["finish_reason"] == "abort"
    # The stream was not cut at the signal: it kept producing tokens for about the grace period.
    assert ended - signalled >= GRACE_S * 0.8
    assert proc.wait(30) == 0, log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


@pytest.mark.slow  # a server process, a 900-token stream and a drain
def test_the_port_stays_open_and_answers_503_while_draining(served):
    """Issue 25: a load balancer's probe during the drain gets the documented 503, not a refused connection."""
    proc, url, log = served
    body = {"prompt": "Once upon a time", "max_tokens": 900, "loops": 16, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
        events = sse_events(r.iter_lines())
        next(events)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(f"{url}/health", timeout=5)  # a fresh connection: the socket still listens
        assert health.status_code == 503 and health.json()["error"]["code"] == "draining", health.text
        late = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready", late.text
        assert list(events)[-2]["finish_reason"] == "abort"
    assert proc.wait(30) == 0, log.read_text()
    with pytest.raises(httpx.TransportError):  # drained: the port is closed
        httpx.get(f"{url}/health", timeout=2)

"""Property-based fuzzing of the served contract: schemathesis reads `/openapi.json` from a live `loopgpt serve`
(the demo checkpoint, one model thread, a 32-token context and loops up to 8 so that every generation is short;
a queue of 8, so that a body's list of prompts, one queue entry each, stays short too)
and, for about a minute, sends schema-valid and schema-violating requests to every operation with every check
on. Zero 5xx, and every response conforms to the document: status, content type, headers, body schema (SSE
events included), invalid data rejected, valid data accepted (see tests/fuzz_checks.py for the documented
400s a JSON Schema cannot express). A second stage sends what no schema describes: clients that leave while
sending their body (counted as 499) and 100 connections sending their headers a byte a second (408 after
--header-timeout). The request count and status histogram of both stages are printed.

    python -m pytest tests/test_server_fuzz.py -q -s            # LOOPGPT_FUZZ_SEED=N for another seed
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_harness import samples, serve_process

FUZZ_SECONDS = 45
HEADER_TIMEOUT_S = 2
POST_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
HOOKS = Path(__file__).resolve().parent / "fuzz_checks.py"
SEED = os.environ.get("LOOPGPT_FUZZ_SEED", "14")  # fixed by default: CI reproducible; vary it to explore


@pytest.fixture
def serve(tmp_path):
    log = tmp_path / "serve.log"
    with serve_process(log, "--threads", "1", "--max-context", "32", "--loop-cap", "8", "--max-batch", "4",
                       "--max-queue", "8", "--header-timeout", str(HEADER_TIMEOUT_S),
                       "--log-level", "warning") as (url, _):
        yield url, log


def histogram(har: Path) -> collections.Counter:
    """(method, path, status) -> count, from schemathesis's HAR report of every request it sent."""
    entries = json.loads(har.read_text())["log"]["entries"]
    return collections.Counter((e["request"]["method"], "/" + e["request"]["url"].split("/", 3)[3].split("?")[0],
                                e["response"]["status"]) for e in entries)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def requests_with(url: str, code: str) -> float:
    """loopgpt_requests_total summed over endpoints and loops, for one status code."""
    return sum(v for labels, v in samples(url).get("loopgpt_requests_total", []) if labels.get("code") == code)


def leave_mid_body(url: str, per_path: int = 10) -> collections.Counter:
    """Clients that announce 100 bytes of body, send 9 and close: each must be a counted 499, never a 500."""
    before = requests_with(url, "499")
    for path in POST_PATHS:
        for _ in range(per_path):
            with connect(url) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                          "Content-Length: 100\r\n\r\n{\"prompt\"".encode())
    deadline = time.monotonic() + 30
    while requests_with(url, "499") < before + per_path * len(POST_PATHS):
        assert time.monotonic() < deadline, "not every client that left was counted as 499"
        time.sleep(0.2)
    return collections.Counter({("POST", path, 499): per_path for path in POST_PATHS})


def slow_headers(url: str, clients: int = 100) -> collections.Counter:
    """`clients` connections sending `GET /health ...` a byte a second: each must be answered 408 and closed."""
    line = b"GET /health HTTP/1.1\r\nHost: fuzz\r\n\r\n"
    sockets = [connect(url) for _ in range(clients)]
    answers: dict[socket.socket, bytes] = {}
    start = time.monotonic()
    for sent in range(len(line)):
        for s in sockets:
            if s not in answers:
                try:
                    s.sendall(line[sent:sent + 1])
                except OSError:  # closed by the server after its 408: read it below
                    answers[s] = b""
        if time.monotonic() - start > HEADER_TIMEOUT_S + 3:
            break
        time.sleep(1)
    statuses = collections.Counter()
    for s in sockets:
        s.settimeout(10)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        s.close()
        statuses[("GET", "/health (a byte a second)", int(data[9:12]) if data[:5] == b"HTTP/" else 0)] += 1
    assert time.monotonic() - start < HEADER_TIMEOUT_S + 15
    return statuses


@pytest.mark.slow  # FUZZ_SECONDS of fuzzing plus schemathesis's start-up
def test_fuzz_the_served_openapi_document(serve, tmp_path, capsys):
    url, log = serve
    har = tmp_path / "fuzz.har"
    # One worker: with two threads, schemathesis's schema compilation hit CPython 3.11's "AST constructor recursion
    # depth mismatch" SystemError (a thread-safety bug of the interpreter, not of our server) now and then.
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-time", str(FUZZ_SECONDS), "--workers", "1",
           "--seed", SEED, "--request-timeout", "30", "--generation-database", "none", "--no-color",
           "--report", "har", "--report-har-path", str(har)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120, cwd=tmp_path,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)})
    counts = histogram(har) + leave_mid_body(url) + slow_headers(url)
    by_status = collections.Counter()
    for (_, _, status), n in counts.items():
        by_status[status] += n
    with capsys.disabled():
        print(f"\nfuzz (seed {SEED}, {FUZZ_SECONDS} s): {sum(counts.values())} requests; by status "
              f"{dict(sorted(by_status.items()))}")
        for (method, path, status), n in sorted(counts.items()):
            print(f"  {method:7} {path:26} {status}  {n}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert sum(counts.values()) >= 300, "the fuzzer hardly ran"
    assert counts[("GET", "/health (a byte a second)", 408)] == 100, counts
    assert not [s for s in by_status if s >= 500], by_status
    assert requests_with(url, "500") == 0
    # No exception escaped a route (server/middleware.py logs each one as "unhandled error") and none was logged
    # anywhere else: hostile sampling values (temperature 1e-300, top_p 1e-300) are served like any other.
    text = log.read_text()
    assert "unhandled error" not in text and "Traceback" not in text

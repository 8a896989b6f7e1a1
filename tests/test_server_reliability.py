"""Issue 25: nothing a client or a checkpoint's chat template does blocks the event loop or turns into a 500.
A client leaving mid-body, a template that raises, spins or explodes (at load and per request), a compressed body,
a long integer, HTTP/1.0 streaming, headers sent a byte at a time, a taken port; and, marked slow, /health's p99
while 8 clients send 1 MB /tokenize bodies (scripts/health_under_load.py).

    python -m pytest tests/test_server_reliability.py -q            # -m slow for the /health p99 measurement
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from loopgpt.server.protocol import MAX_HEADER_BYTES
from loopgpt.server.templates import RENDER_TIMEOUT_S
from server_harness import free_port, metric_value, post, running_server

ROOT = Path(__file__).resolve().parent.parent
USER = {"role": "user", "content": "Hello."}
# Behaves on the three-message conversation rendered at load; each trigger word makes it misbehave one way.
TRAP = ("{% macro deep(n) %}{{ deep(n + 1) }}{% endmacro %}"
        "{% for m in messages %}"
        "{% if m.content == 'divide' %}{{ 1 / 0 }}"
        "{% elif m.content == 'overflow' %}{{ range(10**9) }}"
        "{% elif m.content == 'recurse' %}{{ deep(1) }}"
        "{% elif m.content == 'repeat' %}{% for i in range(100000) %}{{ messages }}{% endfor %}"
        "{% elif m.content == 'huge' %}{{ 'x' * 10**8 }}"
        "{% elif m.content == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
        "{% endfor %}"
        "{% else %}<|{{ m.role }}|>{{ m.content }}{% endif %}"
        "{% endfor %}<|assistant|>")


def with_template(checkpoint: Path, directory: Path, template: str) -> Path:
    shutil.copytree(checkpoint, directory)
    (directory / "chat_template.jinja").write_text(template)
    return directory


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, header_timeout=1.0, max_batch=2) as (url, app):
        yield url, app


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_client_that_leaves_while_sending_its_body_is_a_counted_abort(server, caplog):
    url, _ = server
    caplog.set_level(logging.INFO)
    for path, endpoint in (("/v1/completions", "completions"), ("/generate", "generate"), ("/tokenize", "tokenize")):
        before = metric_value(url, "loopgpt_requests_total", endpoint=endpoint, code="499")
        with raw(url) as s:  # Content-Length 100, 9 bytes sent, gone
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100\r\n\r\n{\"prompt\"".encode())
        deadline = time.monotonic() + 10
        while metric_value(url, "loopgpt_requests_total", endpoint=endpoint, code="499") == before:
            assert time.monotonic() < deadline, f"{path}: the abort was not counted"
            time.sleep(0.05)
    assert metric_value(url, "loopgpt_requests_total", code="500") == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


@pytest.fixture(scope="module")
def trap_server(tiny_checkpoint, tmp_path_factory):
    ckpt = with_template(tiny_checkpoint, tmp_path_factory.mktemp("trap") / "ckpt", TRAP)
    with running_server(ckpt, max_batch=2) as (url, app):
        yield url, app


@pytest.mark.parametrize("trigger,message", [
    ("divide", "ZeroDivisionError"), ("overflow", "OverflowError"), ("recurse", "recursed too deeply"),
    ("repeat", "output exceeds"), ("huge", "output exceeds"),
])
def test_a_template_that_fails_on_a_request_is_a_400_naming_messages(trap_server, trigger, message):
    url, _ = trap_server
    messages = [USER, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": trigger}]
    for path, body in (("/v1/chat/completions", {"messages": messages, "max_tokens": 2}),
                       ("/tokenize", {"messages": messages})):
        r = post(url, path, body)
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert error["param"] == "messages" and message in error["message"], error
    assert post(url, "/v1/chat/completions", {"messages": [USER], "max_tokens": 2}).status_code == 200


def test_a_spinning_template_is_ended_and_never_holds_the_event_loop(trap_server):
    url, _ = trap_server
    result: dict = {}
    spin = [USER, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "spin"}]
    thread = threading.Thread(target=lambda: result.update(r=post(url, "/v1/chat/completions",
                                                                     {"messages": spin, "max_tokens": 2})))
    start = time.monotonic()
    thread.start()
    time.sleep(0.5)  # the render is running in its worker
    health = []
    while thread.is_alive():
        t = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        health.append(time.monotonic() - t)
        time.sleep(0.1)
    elapsed = time.monotonic() - start
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert f"took more than {RENDER_TIMEOUT_S:g} s" in r.json()["error"]["message"]
    assert RENDER_TIMEOUT_S <= elapsed < RENDER_TIMEOUT_S + 10
    assert health and max(health) < 1.0, health  # the event loop answered throughout
    assert post(url, "/tokenize", {"messages": [USER]}).status_code == 200  # its worker was replaced


@pytest.mark.parametrize("template,words", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),
    ("{{ 'x' * 10**8 }}", "output exceeds"),
    ("{% if %}", "does not compile"),
])
def test_a_template_that_fails_at_load_refuses_the_checkpoint(tiny_checkpoint, tmp_path, template, words):
    ckpt = with_template(tiny_checkpoint, tmp_path / "ckpt", template)
    proc = subprocess.run([sys.executable, "-m", "loopgpt.cli", "serve", "--checkpoint", str(ckpt), "--port",
                           str(free_port()), "--threads", "1", "--log-level", "warning"], capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loopgpt serve: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "chat_template.jinja" in lines[0] and words in lines[0] and "Traceback" not in proc.stderr, lines


def test_a_compressed_body_is_a_415_naming_its_encoding(server):
    url, _ = server
    for path in ("/generate", "/v1/completions", "/tokenize"):
        r = httpx.post(f"{url}{path}", content=b"\x1f\x8b\x08\x00", timeout=10,
                       headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert r.status_code == 415 and "gzip" in r.json()["error"]["message"], r.text


def test_a_long_integer_is_a_sentence_for_a_client(server):
    url, _ = server
    r = httpx.post(f"{url}/generate", content=b'{"prompt": "hi", "seed": ' + b"7" * 5000 + b"}", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "5000 digits" in message and "sys." not in message and "int_max_str_digits" not in message, message


def test_draft_loops_at_one_loop_says_why(server):
    url, _ = server
    r = post(url, "/generate?loops=1", {"prompt": "hi", "max_tokens": 2, "speculative": {"draft_loops": 1}})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "speculative", error
    assert "needs loops >= 2" in error["message"] and "1..0" not in error["message"], error


def test_http_1_0_streaming_is_close_delimited(server):
    url, _ = server
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 4, "stream": True}).encode()
    with raw(url) as s:
        s.sendall(b"POST /generate HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        response = read_all(s)  # the server closes the connection: that is where the body ends
    head, _, payload = response.partition(b"\r\n\r\n")
    headers = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:]]
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in headers, head
    assert headers.count(b"connection") == 1 and b"connection: close" in head.lower(), head
    assert payload.rstrip().endswith(b"data: [DONE]") and payload.startswith(b"data: {"), payload[:200]


def test_slow_headers_are_answered_408_and_closed(server):
    url, _ = server  # --header-timeout 1
    sockets = [raw(url) for _ in range(20)]
    start = time.monotonic()
    for s in sockets:
        s.sendall(b"G")
    answers = []
    for s in sockets:
        s.settimeout(10)
        answers.append(read_all(s))  # ends when the server closes it
        s.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[:2]
    assert time.monotonic() - start < 8
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # the server is fine
    with raw(url) as s:  # a byte a second never completes, nor does a header block past the limit
        s.sendall(b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * (MAX_HEADER_BYTES + 1024))
        assert read_all(s).startswith(b"HTTP/1.1 431")


def test_a_kept_alive_connection_is_not_cut_by_the_header_deadline(server):
    url, _ = server  # --header-timeout 1: each request on the connection gets its own deadline
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            assert client.get(f"{url}/health").status_code == 200
            time.sleep(0.6)
        assert client.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_serve_on_a_taken_port_is_one_sentence_before_loading(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "loopgpt.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                               "--port", str(port), "--log-level", "warning"], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"loopgpt serve: error: cannot listen on 127.0.0.1:{port} (Address already in "
                                   "use); choose another --port"), proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_health_p99_while_8_clients_tokenize_1mb(tmp_path):
    """The issue's measurement, 30 s of it (the script's default is 60). Its 50 ms is for a machine not busy with
    other work: on 2 cores at load 7.7 it measured 47 and 48 ms and once went over (the code before issue 25:
    2,297 ms), so a busy machine skips it."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        pytest.skip(f"the machine is busy (load {load:.1f} on {cores} cores): run it on an idle one")
    sys.path.insert(0, str(ROOT / "scripts"))
    from health_under_load import measure

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "loopgpt.cli", "serve", "--port", str(port), "--log-level",
                             "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        report = measure(f"http://127.0.0.1:{port}", seconds=30)
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(report))
    assert report["tokenize_ok"] >= 8 and report["health_failures"] == 0, report
    assert report["health_p99_ms"] <= 50, report

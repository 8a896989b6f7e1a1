"""Hostile and careless clients against a real server: every bad body is a 400 (or 404/415/413) in OpenAI's
error shape, one strict type rule, unsupported OpenAI fields refused by name, a bug is a counted and logged
500 in the same shape, /health is 503 while draining, and the security headers are on every response.

    python -m pytest tests/test_server_errors.py -q
"""

from __future__ import annotations

import logging

import httpx
import pytest
from server_harness import metric_value, post, running_server

ENDPOINTS = ("/generate", "/v1/completions")
DEEP = 100_000  # levels of nesting: far beyond Python's recursion limit (the 1,000 already broke it)
HUGE = "9" * 4301  # one digit over Python's limit for int(str)


def raw(path: str, text: str) -> tuple[str, bytes]:
    return path, text.encode()


BAD_BODIES = [  # (path, JSON text, status, param, code)
    *[(p, '{"prompt": "hi", "stop": ' + "[" * DEEP + "]" * DEEP + "}", 400, None, "invalid_json") for p in ENDPOINTS],
    *[(p, "[" * 1000 + "]" * 1000, 400, None, "invalid_json") for p in ENDPOINTS],
    *[(p, '{"prompt": "hi", "max_tokens": ' + HUGE + "}", 400, None, "invalid_json") for p in ENDPOINTS],
    *[(p, '{"prompt": "hi", "temperature": NaN}', 400, None, "invalid_json") for p in ENDPOINTS],
    *[(p, '{"prompt": "hi", "top_p": Infinity}', 400, None, "invalid_json") for p in ENDPOINTS],
    ("/generate?loops=" + HUGE, '{"prompt": "hi"}', 400, "loops", None),
    ("/generate?loops=1&loops=2", '{"prompt": "hi"}', 400, "loops", None),
    ("/generate?loops=--3", '{"prompt": "hi"}', 400, "loops", None),
    ("/generate?loops=1", '{"prompt": "hi", "loops": 99}', 400, "loops", None),  # a bad body value is never ignored
    # One type rule, OpenAI's: strict. No number from a string, no integer from a float, no bool as a number.
    ("/generate", '{"prompt": "hi", "temperature": "0.5"}', 400, "temperature", None),
    ("/v1/completions", '{"prompt": "hi", "top_p": "0.9"}', 400, "top_p", None),
    ("/generate", '{"prompt": "hi", "loops": 1.0}', 400, "loops", None),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 4.0}', 400, "max_tokens", None),
    ("/generate", '{"prompt": "hi", "max_tokens": true}', 400, "max_tokens", None),
    ("/generate", '{"prompt": "hi", "stream": "yes"}', 400, "stream", None),
    ("/generate", '{"prompt": "hi", "seed": "7"}', 400, "seed", None),
    ("/v1/completions", '{"prompt": [1, 2.0]}', 400, "prompt", None),
    ("/v1/completions", '{"prompt": "hi", "stream_options": {"include_usage": 1}}', 400, "stream_options", None),
    # OpenAI fields we do not implement: refused by name, never silently ignored.
    ("/v1/completions", '{"prompt": "hi", "suffix": "The end."}', 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", '{"prompt": "hi", "presence_penalty": 0.5}', 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/completions", '{"prompt": "hi", "frequency_penalty": -1}', 400, "frequency_penalty",
     "unsupported_parameter"),
    ("/v1/completions", '{"prompt": "hi", "logit_bias": {"5": 10}}', 400, "logit_bias", "unsupported_parameter"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": '
     '"json_object"}}', 400, "response_format", "unsupported_parameter"),
    ("/v1/completions", '{"prompt": "hi", "model": "gpt-4"}', 404, "model", "model_not_found"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 64}', 400, "max_tokens", "context_length_exceeded"),
    # Issue 25: bounds a client can read in the schema, and conversations OpenAI refuses.
    ("/generate", '{"prompt": "hi", "temperature": 7.24e307}', 400, "temperature", None),
    ("/v1/completions", '{"prompt": "hi", "temperature": 2.01}', 400, "temperature", None),
    ("/generate?loops=4", '{"prompt": "hi", "speculative": {"draft_loops": 1, "tokens": 1000000}}', 400,
     "speculative", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user"}]}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": []}]}', 400, "messages", None),
    ("/v1/chat/completions", '{"messages": [{"role": "system", "content": "Be brief."}]}', 400, "messages", None),
    ("/tokenize", '{"messages": [{"role": "developer", "content": "Be brief."}]}', 400, "messages", None),
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=2) as (url, app):
        yield url, app


@pytest.mark.parametrize("path,text,status,param,code", BAD_BODIES,
                         ids=[f"{i}-{b[0][:30]}-{b[1][:40]}" for i, b in enumerate(BAD_BODIES)])
def test_bad_body_is_a_4xx_in_the_openai_shape(server, path, text, status, param, code):
    url, _ = server
    r = httpx.post(f"{url}{path}", content=text.encode(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json" and r.headers["x-content-type-options"] == "nosniff"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    if code == "unsupported_parameter":
        assert error["message"].startswith(f"{param} is not supported")


ACCEPTED = [  # what the strict rule still takes: a JSON integer is a number; the defaults of unsupported fields
    ("/generate", {"temperature": 1, "top_p": 1}),
    ("/v1/completions", {"model": None, "n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
                         "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": None, "user": "u1"}),
    ("/v1/completions", {"prompt": ["Once upon a time"], "stop": ["\n\n"], "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize("path,fields", ACCEPTED)
def test_valid_bodies_are_accepted(server, path, fields):
    url, app = server
    r = post(url, path, {"prompt": "Once upon a time", "max_tokens": 3, **fields})
    assert r.status_code == 200, r.text
    served = app.state.loopgpt.name
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "model": served}).status_code == 200


def test_an_unexpected_error_is_a_counted_logged_500_in_the_openai_shape(server, monkeypatch, caplog):
    """Nothing a client sends reaches this (the fuzz test shows it), so a fault is injected into the real server
    where a bug would be: the prompt's encoding raises."""
    url, app = server
    state = app.state.loopgpt

    def broken_encoder(prompt, special=False):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(state, "encode_prompt", broken_encoder)
    caplog.set_level(logging.ERROR, logger="loopgpt.server")
    for path, endpoint in (("/generate?loops=2", "generate"), ("/v1/completions", "completions")):
        before = metric_value(url, "loopgpt_requests_total", endpoint=endpoint, code="500")
        r = post(url, path, {"prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "server_error" and "injected" not in r.text  # no internals leak
        assert metric_value(url, "loopgpt_requests_total", endpoint=endpoint, code="500") == before + 1
    assert metric_value(url, "loopgpt_requests_total", endpoint="generate", loops="2", code="500") == 1
    logged = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
    assert len(logged) == 2  # once each, with the traceback


def test_security_headers(server):
    url, _ = server
    for path in ("/health", "/v1/models", "/metrics", "/openapi.json", "/no-such-route", "/static/playground.js"):
        r = httpx.get(f"{url}{path}")
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert "content-security-policy" not in r.headers and "x-frame-options" not in r.headers, path
    assert httpx.delete(f"{url}/health").headers["x-content-type-options"] == "nosniff"  # 405
    for path in ("/", "/docs"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in r.text and " style=" not in r.text  # nothing inline for the policy to block


def test_health_is_503_while_draining_even_on_a_kept_alive_connection(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=1) as (url, app), httpx.Client(timeout=10) as client:
        assert client.get(f"{url}/health").status_code == 200
        app.state.loopgpt.engine.drain(60)  # what SIGTERM does (server/serve.py's DrainingServer)
        r = client.get(f"{url}/health")  # the same connection, kept alive
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert post(url, "/generate", {"prompt": "hi", "max_tokens": 2}).status_code == 503

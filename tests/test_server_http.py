"""The HTTP server, for real: uvicorn on a free 127.0.0.1 port, httpx and the official openai client.

    python -m pytest tests/test_server_http.py -q
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from loopgpt.model import SamplingParams, generate_text, load_checkpoint
from server_harness import make_long_checkpoint, metric_value, post, running_server, sse_events

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=4, max_queue=16, max_body=4096, prompt_nll=1.0) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)

    def run(prompt: str, loops: int, max_tokens: int) -> tuple[str, str]:
        *_, (_, c) = generate_text(model, tokenizer, prompt, loops, max_tokens, SamplingParams(0.0))
        return c.text, c.finish_reason

    return run


def stream(url: str, path: str, body: dict) -> list:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


@pytest.mark.parametrize("loops", [1, 16])
def test_generate_stream_and_json(url, oracle, loops):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "stream": True, **GREEDY}
    events = stream(url, f"/generate?loops={loops}", body)
    assert events[-1] == "[DONE]"
    *tokens, last, _ = events
    assert [e["index"] for e in tokens] == list(range(len(tokens)))
    assert all(isinstance(e["token_id"], int) for e in tokens)
    text = "".join(e["text"] for e in tokens) + last["text"]
    expected, reason = oracle("Once upon a time", loops, 12)
    assert (text, last["finish_reason"]) == (expected, reason)
    assert last["loops"] == loops and last["usage"]["completion_tokens"] == len(tokens)
    assert last["timing"]["ttft_s"] > 0 and last["timing"]["e2e_s"] >= last["timing"]["ttft_s"]
    assert last["quality"]["prompt_nll"] > 0 and last["quality"]["token_nll"] > 0

    r = post(url, "/generate", {**body, "stream": False, "loops": loops})  # loops from the body this time
    assert r.status_code == 200
    data = r.json()
    assert (data["text"], data["finish_reason"], data["loops"]) == (expected, reason, loops)
    assert data["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"]


def test_query_loops_wins_over_body(url, oracle):
    r = post(url, "/generate?loops=3", {"prompt": "The end.", "loops": 9, "max_tokens": 6, **GREEDY})
    assert r.json()["loops"] == 3 and r.json()["text"] == oracle("The end.", 3, 6)[0]


def test_concurrent_mixed_loops_interleave_and_match_solo(server, oracle):
    url, app = server
    specs = [("Once upon a time", 1, 30), ("She loved to play", 16, 30), ("Lily ran", 4, 30),
             ("Her mom smiled", 7, 30), ("The ball", 2, 30), ("One day", 11, 30)]  # 6 requests, 4 rows

    async def one(client, prompt, loops, n):
        async with client.stream("POST", f"{url}/generate?loops={loops}",
                                 json={"prompt": prompt, "max_tokens": n, "stream": True, **GREEDY}) as r:
            return list(sse_events([line async for line in r.aiter_lines()]))

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, *s) for s in specs))

    engine = app.state.loopgpt.engine
    steps_before = engine.steps
    results = asyncio.run(main())
    decoded = 0
    for (prompt, loops, n), events in zip(specs, results, strict=True):
        assert events[-1] == "[DONE]"
        text = "".join(e["text"] for e in events[:-1])
        assert (text, events[-2]["finish_reason"]) == oracle(prompt, loops, n), f"loops={loops}"
        # the first token comes from the prefill; each later one takes `loops` decode steps (one loop per step)
        decoded += max(events[-2]["usage"]["completion_tokens"] - 1, 0) * loops
    # Interleaved: rows at different loops shared decode steps, far fewer than they would take one after another.
    assert engine.steps - steps_before < 0.75 * decoded


def test_openai_client_streaming_and_not(url, oracle):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    expected, reason = oracle("Once upon a time", 2, 10)
    done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                      extra_body={"loops": 2})
    assert done.choices[0].text == expected and done.choices[0].finish_reason == reason
    assert done.usage.completion_tokens >= 1 and done.usage.prompt_tokens >= 1
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"loops": 2}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens


def test_models_health_index(url):
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "loopgpt"
    assert card["loops"] == {"min": 1, "max": 16, "default": 4, "trained": 4}
    assert card["eval_loss"]["1"] == pytest.approx(5.9)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = httpx.get(f"{url}/")
    assert r.status_code in (200, 404) and (r.status_code == 200) == ("<html" in r.text.lower())
    r = httpx.get(f"{url}/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["message"]


LONG_PROMPT = "Once upon a time there was a girl. " * 20

BAD = [  # (path, body or raw bytes, headers, status, param)
    ("/generate?loops=0", {"prompt": "hi"}, None, 400, "loops"),
    ("/generate?loops=17", {"prompt": "hi"}, None, 400, "loops"),
    ("/generate?loops=two", {"prompt": "hi"}, None, 400, "loops"),
    ("/generate?loops=2.5", {"prompt": "hi"}, None, 400, "loops"),
    ("/generate", {"prompt": "hi", "loops": 2.5}, None, 400, "loops"),
    ("/generate", {"prompt": "hi", "loops": "3"}, None, 400, "loops"),
    ("/generate", {"prompt": ""}, None, 400, "prompt"),
    ("/generate", {"max_tokens": 3}, None, 400, "prompt"),
    ("/generate", {"prompt": 5}, None, 400, "prompt"),
    ("/generate", {"prompt": LONG_PROMPT, "max_tokens": 8}, None, 400, "prompt"),
    ("/generate", {"prompt": "Once upon a time", "max_tokens": 64}, None, 400, "max_tokens"),
    ("/generate", {"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ("/generate", {"prompt": "hi", "max_tokens": -5}, None, 400, "max_tokens"),
    ("/generate", {"prompt": "hi", "max_tokens": 10**12}, None, 400, "max_tokens"),
    ("/generate", {"prompt": "hi", "max_tokens": 2.5}, None, 400, "max_tokens"),
    ("/generate", {"prompt": "hi", "temperature": -0.1}, None, 400, "temperature"),
    ("/generate", {"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("/generate", {"prompt": "hi", "top_p": 1.5}, None, 400, "top_p"),
    ("/generate", {"prompt": "hi", "top_k": -1}, None, 400, "top_k"),
    ("/generate", {"prompt": "hi", "seed": -1}, None, 400, "seed"),
    ("/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop"),
    ("/generate", b'{"prompt": "hi"', {"content-type": "application/json"}, 400, None),
    ("/generate", b'["hi"]', {"content-type": "application/json"}, 400, None),
    ("/generate", b'{"prompt": "hi"}', {"content-type": "text/plain"}, 415, None),
    ("/generate", b"{}", {}, 415, None),
    ("/generate", b'{"prompt": "' + b"x" * 5000 + b'"}', {"content-type": "application/json"}, 413, None),
    ("/v1/completions", {"prompt": "hi", "loops": 99}, None, 400, "loops"),
    ("/v1/completions", {"prompt": []}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 17}, None, 400, "prompt"),  # more prompts than --max-queue
    ("/v1/completions", {"prompt": [1, 2, 99999]}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [99999]]}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 5}, None, 400, "n"),  # more than --max-batch rows
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 1}, None, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, None, 400, "best_of"),  # best_of > n cannot stream
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, None, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, None, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [99999]}, None, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "max_loops": 17}, None, 400, "max_loops"),
    ("/v1/completions", {"prompt": "hi", "loops": 4, "max_loops": 2}, None, 400, "max_loops"),
    ("/v1/completions?loops=4", {"prompt": "hi", "max_loops": 2}, None, 400, "max_loops"),
    ("/v1/completions", {"prompt": "hi", "priority": 2**31}, None, 400, "priority"),
    ("/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, None, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, None,
     400, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, None, 400, "temperature"),
]


@pytest.mark.parametrize("path,body,headers,status,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(url, path, body, headers, status, param):
    if isinstance(body, bytes):
        r = httpx.post(f"{url}{path}", content=body, headers=headers, timeout=30)
    else:
        r = post(url, path, {**body, "stream": True})  # errors come before the first streamed byte
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error


def test_unknown_fields_are_ignored(url):
    r = post(url, "/generate", {"prompt": "hi", "max_tokens": 2, "frobnicate": True, "logit_bias": {}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_api_key(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=1, api_key="s3cret") as (url, _):
        body = {"prompt": "hi", "max_tokens": 2}
        assert post(url, "/generate", body).status_code == 401
        r = post(url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert post(url, "/generate", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


def test_disconnect_frees_the_row_and_queue_full_is_429(tmp_path_factory, bpe):
    """One row, one queue slot: a long request runs, a second waits, a third gets 429; leaving frees all."""
    ckpt = make_long_checkpoint(tmp_path_factory.mktemp("long-ckpt"), bpe)
    with running_server(ckpt, max_batch=1, max_queue=1) as (url, _):
        body = {"prompt": "Once upon a time", "max_tokens": 900, "stream": True, "loops": 16, "temperature": 0}
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with c1.stream("POST", f"{url}/generate", json=body) as running:
                lines = sse_events(running.iter_lines())
                first_two = [next(lines), next(lines)]
                assert [e["index"] for e in first_two] == [0, 1]
                with c2.stream("POST", f"{url}/generate", json=body) as waiting:
                    assert waiting.status_code == 200
                    r = post(url, "/generate", body)
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert r.json()["error"]["type"] == "rate_limit_error"
                    assert httpx.get(f"{url}/health").status_code == 200
                    assert metric_value(url, "loopgpt_requests_running") == 1
                    assert metric_value(url, "loopgpt_requests_waiting") == 1
        deadline = time.monotonic() + 20
        while metric_value(url, "loopgpt_requests_running") or metric_value(url, "loopgpt_requests_waiting"):
            assert time.monotonic() < deadline, "aborted requests still hold the batch after 20 s"
            time.sleep(0.05)
        aborted = metric_value(url, "loopgpt_request_success_total", loops="16", finish_reason="abort")
        assert aborted == 2
        assert metric_value(url, "loopgpt_requests_total", endpoint="generate", loops="16", code="429") == 1
        assert post(url, "/generate", {**body, "max_tokens": 3, "stream": False}).status_code == 200


@pytest.mark.parametrize("poison", [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300},
                                    {"temperature": 1.0, "top_k": 10**20}])  # the last one killed the engine once
def test_extreme_sampling_values_hurt_nobody(server, oracle, poison):
    """A temperature or top_p of 1e-300 (once: sampling raised, the engine aborted the whole batch), or a top_k of
    1e20 (once: an overflow killed the engine thread; found by the fuzzer) beside four running streams: it is
    served (1e-300 is greedy, top_p keeps the likeliest token, top_k beyond the vocabulary filters nothing)
    and the four finish with the tokens they get alone."""
    url, _ = server
    specs = [("Once upon a time", 1, 24), ("She loved to play", 3, 16), ("Lily ran", 2, 20), ("The ball", 4, 12)]

    async def one(client, body):
        async with client.stream("POST", f"{url}/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            return list(sse_events([line async for line in r.aiter_lines()]))

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            streams = [one(client, {"prompt": p, "loops": n, "max_tokens": m, **GREEDY}) for p, n, m in specs]
            poisoned = one(client, {"prompt": "hi", "max_tokens": 4, "loops": 2, **poison})
            return await asyncio.gather(*streams, poisoned)

    *results, poisoned = asyncio.run(main())
    assert poisoned[-2]["finish_reason"] in ("stop", "length") and "error" not in poisoned[-2]
    if poison["temperature"] < 1e-5:  # greedy, so it must equal the greedy text
        assert "".join(e["text"] for e in poisoned[:-1]) == oracle("hi", 2, 4)[0]
    for (prompt, loops, n), events in zip(specs, results, strict=True):
        assert events[-2]["finish_reason"] in ("stop", "length")
        assert ("".join(e["text"] for e in events[:-1]), events[-2]["finish_reason"]) == oracle(prompt, loops, n)


def test_speculative_requests_stream_the_plain_greedy_text(url, oracle):
    for spec in ("auto", {"draft_loops": 1}, {"draft_loops": 2, "tokens": 2}):
        body = {"prompt": "Once upon a time", "max_tokens": 20, "loops": 4, "speculative": spec, **GREEDY}
        r = post(url, "/generate", body)
        assert r.status_code == 200, r.text
        assert (r.json()["text"], r.json()["finish_reason"]) == oracle("Once upon a time", 4, 20), spec
    r = post(url, "/v1/completions", {"prompt": "The end.", "max_tokens": 8, "loops": 3,
                                      "speculative": {"draft_loops": 1}, **GREEDY})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == oracle("The end.", 3, 8)[0]


@pytest.mark.parametrize("spec, param", [({"draft_loops": 4}, "speculative.draft_loops"),
                                         ({"draft_loops": 0}, "speculative.draft_loops"),
                                         ({"draft_loops": 1, "tokens": 0}, "speculative.tokens"),
                                         ({"draft_loops": 1.0}, "speculative.draft_loops"),
                                         ({"draft_loops": 1, "depth": 2}, "speculative.depth"),
                                         ("always", "speculative")])
def test_bad_speculative_values_are_400_naming_the_field(url, spec, param):
    r = post(url, "/generate", {"prompt": "Hi", "max_tokens": 4, "loops": 4, "speculative": spec})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "speculative" and error["message"].startswith(param), error


def test_serve_kv_budget_shares_slots_and_decodes_like_the_reference(tiny_checkpoint):
    """--kv-budget 2: the served model keeps 2 K/V slots per layer (loop 0's and one the deeper loops share); its
    greedy text equals the reference decode of the same config; a speculative or adaptive request is refused by name."""
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    model.config = model.config.with_kv_budget(2)
    with running_server(tiny_checkpoint, max_batch=2, kv_budget=2) as (url, app):
        assert app.state.loopgpt.engine.runner.cache.slots == 2 * model.config.n_layer
        r = post(url, "/generate", {"prompt": "Once upon a time", "max_tokens": 12, "loops": 4, **GREEDY})
        *_, (_, c) = generate_text(model, tokenizer, "Once upon a time", 4, 12, SamplingParams(0.0))
        assert r.status_code == 200 and r.json()["text"] == c.text
        r = post(url, "/generate", {"prompt": "Hi", "max_tokens": 4, "loops": 4, "speculative": {"draft_loops": 1}})
        assert r.status_code == 400 and "kv_budget" in r.json()["error"]["message"]
        r = post(url, "/generate", {"prompt": "Hi", "max_tokens": 4, "loops": "auto"})  # model/adaptive.py's refusal
        assert r.status_code == 400 and r.json()["error"]["param"] == "loops" and "(kv_budget 2)" in r.text


def test_loops_auto_over_http_reports_the_loops_it_used(url):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "loops": "auto", "max_loops": 4, "tolerance": 0.05,
            **GREEDY}
    r = post(url, "/generate", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["loops"] == "auto" and 1 <= data["loops_per_token"] <= 4
    events = stream(url, "/generate?loops=auto", {**body, "loops": None, "stream": True})
    final = events[-2]
    assert final["loops"] == "auto" and final["loops_per_token"] == data["loops_per_token"]
    assert "".join(e["text"] for e in events[:-1]) == data["text"]
    r = post(url, "/v1/completions", {"prompt": "The end.", "max_tokens": 6, "loops": "auto", **GREEDY})
    assert r.status_code == 200 and r.json()["loops"] == "auto" and r.json()["loops_per_token"] >= 1
    fixed = post(url, "/generate", {"prompt": "Hi", "max_tokens": 3, "loops": 3, **GREEDY}).json()
    assert fixed["loops"] == 3 and fixed["loops_per_token"] == 3
    metrics = httpx.get(f"{url}/metrics").text
    assert 'loopgpt_loops_per_token_count{mode="auto"}' in metrics and 'loops="auto"' in metrics


@pytest.mark.parametrize("body, param", [({"loops": "auto", "max_loops": 99}, "max_loops"),
                                         ({"loops": "auto", "max_loops": 2, "min_loops": 3}, "min_loops"),
                                         ({"loops": "auto", "tolerance": -1}, "tolerance"),
                                         ({"loops": "deep"}, "loops"),
                                         ({"loops": "auto", "speculative": {"draft_loops": 1}}, "speculative")])
def test_bad_adaptive_values_are_400_naming_the_field(url, body, param):
    r = post(url, "/generate", {"prompt": "Hi", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()

"""Choices and controls through the API on the demo checkpoint: `n` choices with seed s equal n requests with seeds
s + i (streaming too), `best_of` keeps the candidates of highest cumulative logprob, lists of prompts, min_tokens,
ignore_eos, stop_token_ids, max_loops; and in the engine: priority order at admission, a group admitted whole, the
per-priority waiting gauge beside the unlabelled one.

    python -m pytest tests/test_api_choices.py -q
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest
from loopgpt.model import SamplingParams, load_checkpoint
from loopgpt.server.engine import Engine, ModelRunner, Request
from loopgpt.server.metrics import ServerMetrics
from server_harness import Collector, post, running_server, sse_events

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
SAMPLED = {"temperature": 1.0, "max_tokens": 8, "loops": 2}


@pytest.fixture(scope="module")
def server():
    with running_server(DEMO, max_batch=4, max_queue=16) as (url, app):
        yield url, app


def text(url: str, **body) -> str:
    return post(url, "/v1/completions", body).json()["choices"][0]["text"]


def test_n_choices_with_a_seed_equal_separate_requests_with_seed_plus_index(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    sampling = {"temperature": 1.0, "max_tokens": 8, "extra_body": {"loops": 2}}
    out = client.completions.create(model="demo", prompt="Once upon a time", n=3, seed=7, **sampling)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [text(url, prompt="Once upon a time", seed=7 + i, **SAMPLED) for i in range(3)]
    assert [c.text for c in out.choices] == alone and len(set(alone)) > 1
    assert out.usage.prompt_tokens == 4  # the prompt is counted (and prefilled) once
    streamed = {}
    for chunk in client.completions.create(model="demo", prompt="Once upon a time", n=3, seed=7, stream=True,
                                           **sampling):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == alone


def test_best_of_keeps_the_candidates_of_highest_cumulative_logprob(server):
    url, _ = server
    out = post(url, "/v1/completions", {"prompt": "The dog", "n": 2, "best_of": 4, "seed": 3, **SAMPLED}).json()
    candidates, generated = [], 0
    for i in range(4):
        c = post(url, "/v1/completions", {"prompt": "The dog", "seed": 3 + i, "logprobs": 0, **SAMPLED}).json()
        candidates.append((sum(c["choices"][0]["logprobs"]["token_logprobs"]), c["choices"][0]["text"]))
        generated += c["usage"]["completion_tokens"]
    best = [t for _, t in sorted(candidates, reverse=True)[:2]]
    assert len({t for _, t in candidates}) == 4  # distinct candidates: the choice is a real one
    assert [c["text"] for c in out["choices"]] == best and [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["completion_tokens"] == generated  # every candidate's tokens were generated


def test_a_list_of_prompts_is_one_choice_set_per_prompt(server):
    url, app = server
    tokenizer = app.state.loopgpt.loaded.tokenizer
    prompts = ["Once upon a time", "The little dog"]
    for prompt in (prompts, [tokenizer.encode(p) for p in prompts]):
        out = post(url, "/v1/completions", {"prompt": prompt, "n": 2, "seed": 11, **SAMPLED}).json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        alone = [text(url, prompt=p, seed=11 + i, **SAMPLED) for p in prompts for i in range(2)]
        assert [c["text"] for c in out["choices"]] == alone
        assert out["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)


def test_min_tokens_ignore_eos_and_stop_token_ids(server):
    url, app = server
    eot = app.state.loopgpt.loaded.tokenizer.eot_token
    body = {"prompt": "The end.", "max_tokens": 6, "temperature": 0, "loops": 2}
    ended = post(url, "/v1/completions", body).json()["choices"][0]
    assert (ended["text"], ended["finish_reason"]) == ("", "stop")  # the demo ends its story here
    kept = post(url, "/v1/completions", {**body, "ignore_eos": True}).json()["choices"][0]
    assert kept["text"].startswith("<|endoftext|>") and kept["finish_reason"] == "length"
    banned = post(url, "/v1/completions", {**body, "min_tokens": 3, "logprobs": 1}).json()["choices"][0]
    lp = banned["logprobs"]
    assert len(lp["tokens"]) >= 3 and "<|endoftext|>" not in "".join(lp["tokens"][:3])
    # the untempered distribution is reported: EOS stays the likeliest, the token drawn is the best allowed
    assert max(lp["top_logprobs"][0], key=lp["top_logprobs"][0].get) == "<|endoftext|>"
    with httpx.stream("POST", f"{url}/generate", json={**body, "ignore_eos": True, "stream": True}) as r:
        ids = [e["token_id"] for e in sse_events(r.iter_lines()) if isinstance(e, dict) and "token_id" in e]
    assert ids[0] == eot
    cut = post(url, "/v1/completions", {**body, "ignore_eos": True, "stop_token_ids": [ids[2]]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] == 2


def test_max_loops_caps_the_default_depth(server):
    url, _ = server
    out = post(url, "/v1/completions", {"prompt": "Once", "max_tokens": 2, "max_loops": 3}).json()
    assert out["loops"] == 3  # the trained default (6) cut to the budget
    assert post(url, "/v1/completions", {"prompt": "Once", "max_tokens": 2, "model": "demo:loops=2"}).json()[
        "loops"] == 2


@pytest.fixture(scope="module")
def demo():
    model, tokenizer, _ = load_checkpoint(DEMO)
    return model, tokenizer


def test_priority_orders_admission_and_ties_stay_in_arrival_order(demo):
    model, tokenizer = demo
    metrics = ServerMetrics(model.config.loop_cap)
    engine = Engine(ModelRunner(model, max_batch=1), tokenizer, metrics=metrics)
    ids, order = tokenizer.encode("Once upon a time"), []
    engine.start()
    try:
        with engine.cond:  # nothing is admitted until all are queued
            for name, priority in (("a", 0), ("b", 5), ("c", -1), ("d", 0), ("e", -1)):
                engine.submit(Request(ids, 1, 2, SamplingParams(0.0), emit=Collector(order, name), priority=priority))
            engine._report()  # what the engine thread does after each turn
            scrape = metrics.exposition().decode()
        assert "loopgpt_requests_waiting 5.0" in scrape  # the series KEDA and the gateway read, unchanged
        for priority, n in (("-1", 2), ("0", 2), ("5", 1)):
            assert f'loopgpt_requests_waiting_by_priority{{priority="{priority}"}} {n}.0' in scrape
        while len(order) < 5:
            threading.Event().wait(0.05)
        assert order == ["c", "e", "a", "d", "b"]
        engine._report()
        assert "loopgpt_requests_waiting_by_priority{" not in metrics.exposition().decode()  # none wait: no series
    finally:
        engine.stop()


def test_a_group_equals_separate_requests(demo):
    """n = 3 on a 3-row batch with one row busy and a request behind it: the group is admitted in parts (a group
    takes at most half the rows while others wait, tests/test_scheduler.py), and its choices sample what three
    separate requests sample."""
    model, tokenizer = demo
    engine = Engine(ModelRunner(model, max_batch=3), tokenizer)
    ids, params = tokenizer.encode("The little dog"), SamplingParams(1.0)
    engine.start()
    try:
        busy = Collector()
        engine.submit(Request(tokenizer.encode("Once"), 6, 60, SamplingParams(0.0), emit=busy, eos_token=-1))
        while not busy.events:  # running (its first token is out)
            threading.Event().wait(0.01)
        group = [Collector() for _ in range(3)]
        reqs = [Request(ids, 2, 6, params, emit=c, seed=21 + i, eos_token=-1) for i, c in enumerate(group)]
        reqs[0].siblings = reqs[1:]
        behind = Collector()
        with engine.cond:
            engine.submit(reqs[0])
            engine.submit(Request(ids, 1, 2, params, emit=behind))
        assert engine.counts() == (1, 2)
        busy.tokens()
        got = [c.tokens() for c in group]
        behind.tokens()
        alone = []
        for i in range(3):
            c = Collector()
            engine.submit(Request(ids, 2, 6, params, emit=c, seed=21 + i, eos_token=-1))
            alone.append(c.tokens())
        assert got == alone
    finally:
        engine.stop()


def test_the_openai_client_sends_every_new_field(server):
    """Each new field through the official client (extensions in extra_body), streaming and not, equals the same
    body sent by hand."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    extra = {"loops": 2, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [0], "priority": -3, "max_loops": 4}
    fields = {"prompt": "The end.", "max_tokens": 5, "temperature": 0.8, "seed": 9, "echo": True, "logprobs": 2}
    out = client.completions.create(model="demo", best_of=2, extra_body=extra, **fields)
    by_hand = post(url, "/v1/completions", {**fields, **extra, "best_of": 2}).json()
    assert out.choices[0].text == by_hand["choices"][0]["text"] and out.choices[0].text.startswith("The end.")
    assert out.choices[0].logprobs.token_logprobs == by_hand["choices"][0]["logprobs"]["token_logprobs"]
    assert out.choices[0].logprobs.token_logprobs[0] is None and out.model_extra["loops"] == 2
    chunks = list(client.completions.create(model="demo", stream=True, extra_body=extra, **fields))
    assert "".join(c.choices[0].text for c in chunks) == post(url, "/v1/completions", {**fields, **extra}).json()[
        "choices"][0]["text"]
    assert [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs][0] is None

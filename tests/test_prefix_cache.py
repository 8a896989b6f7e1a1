"""The depth-aware prefix cache (server/engine/prefix_cache.py): a prompt prefix computed at depth D serves requests at
any depth with the tokens and logprobs they get without it (deeper ones run only the missing loops, and their blocks
replace the shallower); it never serves across adaptive or KV-budget settings, and never exceeds its memory.

    python -m pytest tests/test_prefix_cache.py -q
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from loopgpt.loadtest.runner import with_shared_prefix
from loopgpt.model import SamplingParams, load_checkpoint
from loopgpt.server.engine import (
    Adaptive,
    Engine,
    FinishEvent,
    ModelRunner,
    PrefillChunk,
    Request,
    SpecRequest,
    TokenEvent,
)
from loopgpt.server.engine.prefix_cache import BLOCK, chain
from loopgpt.server.logprobs import PromptScores
from loopgpt.server.metrics import ServerMetrics
from prometheus_client import CollectorRegistry
from server_harness import running_server

GREEDY = SamplingParams(temperature=0.0)
MB = 1 << 20


class Events:
    def __init__(self):
        self.tokens: list[TokenEvent] = []
        self.final: FinishEvent | None = None
        self.prompt: PromptScores | None = None
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        if isinstance(ev, PromptScores):
            self.prompt = ev
        elif isinstance(ev, TokenEvent):
            self.tokens.append(ev)
        elif isinstance(ev, FinishEvent):
            self.final = ev
            self.done.set()

    def wait(self) -> Events:
        assert self.done.wait(120), "request did not finish within 120 s"
        return self


class Checked(ModelRunner):
    """A real runner that checks after every turn that its prefix cache holds at most its capacity, and fills a
    freed row's K/V with noise: a request that reused the row's stale prompt instead of the cached one would show."""

    def run(self, plan):
        out = super().run(plan)
        if self.prefix is not None:
            assert self.prefix.used == sum(b.nbytes for b in self.prefix.blocks.values()) <= self.prefix.capacity
        return out

    def free(self, row: int) -> None:
        super().free(row)
        self.cache.k[:, row].normal_(0, 3)
        self.cache.v[:, row].normal_(0, 3)
        if self.prefix is not None:
            self.prefix.states[row].normal_(0, 3)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def prefix(parts):
    """Two full blocks of text every prompt below starts with."""
    ids = parts[1].encode("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                          "sun with her big red ball.")
    assert len(ids) >= 2 * BLOCK
    return ids[:2 * BLOCK]


def serve(model, tokenizer, reqs: list[dict], cache_bytes: int, lanes: int = 1, metrics=None):
    """Run `reqs` (Request keyword arguments, plus `n`) one after the other; their Events, and the runner."""
    runner = Checked(model, max_batch=4, prefix_cache_bytes=cache_bytes, lanes_per_row=lanes)
    engine = Engine(runner, tokenizer, prompt_nll=0.0, metrics=metrics)
    engine.start()
    out = []
    try:
        for spec in reqs:
            spec = dict(spec)
            n = spec.pop("n", 1)
            group = [Events() for _ in range(n)]
            made = [Request(emit=e, eos_token=-1, **{**spec, "seed": spec.get("seed", 0) + i})
                    for i, e in enumerate(group)]
            made[0].siblings = made[1:]
            engine.submit(made[0])
            out.append([e.wait() for e in group])
    finally:
        engine.stop()
    return out, runner


def same(got: list[list[Events]], want: list[list[Events]]) -> None:
    """Identical tokens, and their logprobs and top alternatives equal to float tolerance."""
    for i, (a_group, b_group) in enumerate(zip(got, want, strict=True)):
        for a, b in zip(a_group, b_group, strict=True):
            assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens], i
            assert [t.nll for t in a.tokens] == pytest.approx([t.nll for t in b.tokens], rel=1e-4, abs=1e-5)
            for ta, tb in zip(a.tokens, b.tokens, strict=True):
                assert [t for t, _ in ta.top] == [t for t, _ in tb.top]
                assert [p for _, p in ta.top] == pytest.approx([p for _, p in tb.top], rel=1e-4, abs=1e-5)


def ask(ids: list[int], loops: int | None, **kw) -> dict:
    return dict(prompt_ids=ids, loops=loops, max_tokens=kw.pop("max_tokens", 8), params=kw.pop("params", GREEDY),
                logprobs=5, **kw)


def test_a_prefix_serves_every_depth_and_a_deeper_one_replaces_it(parts, prefix):
    model, tokenizer = parts
    tail = [tokenizer.encode(s) for s in (" Her mom smiled.", " The end.", " One day she saw a dog.")]
    other = tokenizer.encode("Lily ran and kicked the ball high into the sky, and her mom said yes, she can play.")
    reqs = [ask(prefix + tail[0], 6), ask(prefix + tail[1], 2), ask(prefix + tail[2], 6),  # cached at 6: 2 and 6
            ask(other, 2), ask(other + tail[0], 6), ask(other + tail[1], 2), ask(other + tail[2], 6)]  # at 2: 6 and 2
    got, runner = serve(model, tokenizer, reqs, MB)
    want, _ = serve(model, tokenizer, reqs, 0)
    same(got, want)
    full = len(other) // BLOCK * BLOCK
    assert [g[0].final.cached_tokens for g in got] == [0, 2 * BLOCK, 2 * BLOCK, 0, full, full, full]
    assert [g[0].final.cached_tokens for g in want] == [0] * len(reqs)
    keys = [key for key, _, _ in chain(other)]
    assert {runner.prefix.blocks[k].depth for k in keys} == {6}  # the depth-6 request replaced the depth-2 blocks


def test_blocks_of_several_depths_in_one_prefix(parts, prefix):
    """Two blocks cached at 6, the next at 2 (a longer prompt served at 2), then the longer prompt at 4: the first
    two give their 4 loops, the third runs loops 2 and 3 from its kept states; then at 6, loops 4 and 5 from the
    states that run left."""
    model, tokenizer = parts
    more = tokenizer.encode(" Her mom smiled and said yes. Lily ran and kicked the ball high into the sky.")[:BLOCK]
    assert len(more) == BLOCK
    ends = [tokenizer.encode(s) for s in (" The end.", " Yes.", " No.")]
    reqs = [ask(prefix + ends[0], 6), ask(prefix + more + ends[1], 2), ask(prefix + more + ends[2], 4),
            ask(prefix + more + ends[0], 6)]
    got, runner = serve(model, tokenizer, reqs, MB)
    want, _ = serve(model, tokenizer, reqs, 0)
    same(got, want)
    assert [g[0].final.cached_tokens for g in got] == [0, 2 * BLOCK, 3 * BLOCK, 3 * BLOCK]
    assert [runner.prefix.blocks[k].depth for k, _, _ in chain(prefix + more)] == [6, 6, 6]


def test_requests_queued_together_wait_for_their_common_prefix(parts, prefix):
    """Three prompts with one prefix submitted at once (lm-eval's choices of one context): the first prefills it,
    the others wait for its blocks and prefill only their own ends."""
    model, tokenizer = parts
    ends = [tokenizer.encode(s) for s in (" The end.", " Her mom smiled.", " She ran.")]
    reqs = [ask(prefix + e, 4) for e in ends]
    got, want = [], []
    for cache_bytes, out in ((MB, got), (0, want)):
        engine = Engine(Checked(model, max_batch=4, prefix_cache_bytes=cache_bytes), tokenizer, prompt_nll=0.0)
        events = [Events() for _ in reqs]
        engine.start()
        try:
            with engine.cond:  # all queued before the engine looks
                for r, e in zip(reqs, events, strict=True):
                    engine.submit(Request(emit=e, eos_token=-1, **r))
            out.extend([e.wait()] for e in events)
        finally:
            engine.stop()
    same(got, want)
    assert [g[0].final.cached_tokens for g in got] == [0, 2 * BLOCK, 2 * BLOCK]


def test_n_choices_and_speculation_from_a_cached_prefix(parts, prefix):
    model, tokenizer = parts
    warm = ask(prefix + tokenizer.encode(" The end."), 4)
    sampled = SamplingParams(temperature=0.9)
    reqs = [warm, ask(prefix + tokenizer.encode(" Her mom"), 3, n=3, params=sampled, seed=7),
            ask(prefix + tokenizer.encode(" She saw"), 4, speculative=SpecRequest(draft_loops=1, tokens=3),
                max_tokens=12),
            ask(prefix + tokenizer.encode(" She ran"), 4, speculative=SpecRequest(draft_loops=2, tokens=2), n=2,
                params=sampled, seed=3)]
    got, _ = serve(model, tokenizer, reqs, MB, lanes=4)
    want, _ = serve(model, tokenizer, reqs, 0, lanes=4)
    same(got, want)
    assert [g[0].final.cached_tokens for g in got[1:]] == [2 * BLOCK] * 3


def test_eviction_under_a_tiny_budget_keeps_the_cache_within_it(parts, prefix):
    """Room for three depth-4 blocks, two prompts of two blocks each: each one's second block evicts the other's
    (least recently used first; a prompt's first block is used more recently than its second)."""
    model, tokenizer = parts
    size = ModelRunner(model, max_batch=1, prefix_cache_bytes=1).prefix.block_bytes(4)
    other = tokenizer.encode("Her mom smiled and said yes. Lily ran and kicked the ball high into the sky. The end.")
    other = other[:2 * BLOCK]
    assert len(other) == 2 * BLOCK
    end = tokenizer.encode(" Yes.")
    reqs = [ask(prefix + end, 4), ask(other + end, 4), ask(prefix + end, 4), ask(other + end, 4),
            ask(prefix + end, 4)]
    got, runner = serve(model, tokenizer, reqs, 3 * size)
    want, _ = serve(model, tokenizer, reqs, 0)
    same(got, want)
    assert [g[0].final.cached_tokens for g in got] == [0, 0, BLOCK, BLOCK, BLOCK]
    assert runner.prefix.used == 3 * size


def test_scored_prompts_are_scored_from_the_cache_at_their_own_depth(parts, prefix):
    """Echo's prompt logprobs from a cached prefix: its positions are scored from their states after the request's
    last loop (kept at that depth, or run deeper at admission); a prefix cached deeper than the request cannot score
    it and is not used. The sampled prompt_nll metric of a cache hit covers the positions the request computes."""
    model, tokenizer = parts
    ends = [tokenizer.encode(s) for s in (" The end.", " Her mom smiled.", " She ran.", " Yes.")]
    reqs = [ask(prefix + ends[0], 3), ask(prefix + ends[1], 3, prompt_logprobs=5), ask(prefix + ends[2], 5),
            ask(prefix + ends[3], 3, prompt_logprobs=2)]
    got, want = [], []
    echo_all = [{**r, "prompt_logprobs": r.get("prompt_logprobs") or 1} for r in reqs]
    for cache_bytes, out, asked in ((MB, got, reqs), (0, want, echo_all)):
        runner = Checked(model, max_batch=4, prefix_cache_bytes=cache_bytes)
        engine = Engine(runner, tokenizer, prompt_nll=1.0)  # every prompt scored for the prompt_nll metric
        engine.start()
        try:
            for r in asked:
                events = Events()
                engine.submit(Request(emit=events, eos_token=-1, **r))
                out.append([events.wait()])
        finally:
            engine.stop()
    same(got, want)
    # 3 then 3: from the cache; at 5: loops 3 and 4 run from the kept states; at 3 again: the depth-5 blocks cannot
    # give depth-3 states, so it prefills whole
    cached = [g[0].final.cached_tokens for g in got]
    assert cached == [0, 2 * BLOCK, 2 * BLOCK, 0]
    for a, b, r, hit in zip(got, want, reqs, cached, strict=True):
        # echo scores every position; the metric alone those after the cached prefix (its own prefill)
        scored = b[0].prompt.logprobs[0 if r.get("prompt_logprobs") is not None else hit:]
        assert a[0].final.prompt_nll == pytest.approx(-sum(scored) / len(scored), rel=1e-4)
        assert b[0].final.prompt_nll == pytest.approx(-sum(b[0].prompt.logprobs) / len(b[0].prompt.logprobs), rel=1e-4)
        if r.get("prompt_logprobs") is not None:  # echo: every prompt position's logprob and alternatives
            assert len(a[0].prompt.logprobs) == len(r["prompt_ids"]) - 1
            assert a[0].prompt.logprobs == pytest.approx(b[0].prompt.logprobs, rel=1e-4, abs=1e-5)
            assert [[t for t, _ in top] for top in a[0].prompt.top] == [[t for t, _ in top] for top in b[0].prompt.top]
        else:
            assert a[0].prompt is None


def test_never_across_adaptive_requests(parts, prefix):
    model, tokenizer = parts
    ids = prefix + tokenizer.encode(" The end.")
    auto = Adaptive(0.05, 2, 6)
    reqs = [ask(ids, None, adaptive=auto), ask(ids, 6), ask(ids, None, adaptive=auto), ask(ids, 6)]
    got, _ = serve(model, tokenizer, reqs, MB)
    want, _ = serve(model, tokenizer, reqs, 0)
    same(got, want)
    assert [g[0].final.cached_tokens for g in got] == [0, 0, 0, 2 * BLOCK]  # adaptive ones neither keep nor read


def test_never_with_a_kv_budget(tiny_checkpoint, parts, prefix):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    model.config = model.config.with_kv_budget(2)
    ids = prefix + tokenizer.encode(" The end.")
    got, runner = serve(model, tokenizer, [ask(ids, 6), ask(ids, 6)], MB)
    assert runner.prefix is None and [g[0].final.cached_tokens for g in got] == [0, 0]
    assert [t.token_id for t in got[0][0].tokens] == [t.token_id for t in got[1][0].tokens]


def test_metrics_count_prompt_tokens(parts, prefix):
    model, tokenizer = parts
    metrics = ServerMetrics(16, registry=CollectorRegistry())
    a, b = prefix + tokenizer.encode(" The end."), prefix + tokenizer.encode(" Her mom smiled.")
    serve(model, tokenizer, [ask(a, 3), ask(b, 3), ask(b, 3, prompt_logprobs=1)], MB, metrics=metrics)
    value = metrics.registry.get_sample_value
    assert value("loopgpt_prefix_cache_queries_total") == len(a) + 2 * len(b)
    assert value("loopgpt_prefix_cache_hits_total") == 4 * BLOCK
    assert 0 < value("loopgpt_prefix_cache_usage_ratio") <= 1


def test_openai_usage_reports_cached_tokens(tiny_checkpoint, prefix, parts):
    text = parts[1].decode(prefix) + " The end."
    with running_server(tiny_checkpoint, max_batch=2, engine="thread", prompt_nll=0.0) as (url, _):
        body = {"prompt": text, "max_tokens": 2, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        second = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= BLOCK
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "loopgpt_prefix_cache_hits_total" in metrics
        shared = with_shared_prefix(url, ["The dog ran.", "Lily saw a bird."], 20)  # loadtest --shared-prefix 20
        ids = [httpx.post(f"{url}/tokenize", json={"prompt": p}, timeout=10).json()["tokens"] for p in shared]
        assert ids[0][:19] == ids[1][:19] and ids[0] != ids[1]
    with running_server(tiny_checkpoint, max_batch=1, engine="thread", prompt_nll=0.0, prefix_cache=False) as (url, _):
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_a_block_loaded_from_a_deeper_entry_is_not_kept_again_once_that_is_evicted(parts, prefix):
    """A row at depth 4 loads blocks computed at 6: it holds their K/V of loops < 4 but not their states after loop
    3, so if those entries are evicted before its prefill completes, it keeps nothing from them on (the prefix's
    blocks would otherwise hold wrong states for scoring and deeper loops)."""
    model, _ = parts
    runner = ModelRunner(model, max_batch=2, prefix_cache_bytes=MB)
    cache, ids = runner.prefix, prefix + prefix[:BLOCK] + [1]
    with torch.inference_mode():
        runner._prefill([PrefillChunk(0, ids, 0, 6)])
        cache.store(0, ids, 6)
        blocks = cache.match(ids, 4)
        assert [b.depth for b in blocks] == [6, 6, 6]
        cache.load(model, 1, blocks[:2], 4)
        runner._prefill([PrefillChunk(1, ids[2 * BLOCK:], 2 * BLOCK, 4)])
        cache.blocks.clear()  # evicted meanwhile
        cache.used = 0
        cache.store(1, ids, 4)
    assert cache.blocks == {} and cache.used == 0


def test_prefill_packs_chunks_of_similar_lengths():
    """A hit's short suffix is not padded to a long prompt beside it: forwards of similar lengths, padding within a
    quarter of their positions, every chunk exactly once."""
    from loopgpt.server.engine.runner import packs

    chunks = [PrefillChunk(r, [1] * n, 0, 6) for r, n in enumerate([20, 128, 22, 100, 5, 18])]
    got = packs(chunks)
    assert [[len(c.ids) for c in g] for g in got] == [[128, 100], [22, 20, 18], [5]]
    for g in got:
        assert len(g[0].ids) * len(g) <= 1.25 * sum(len(c.ids) for c in g)
    assert [len(g) for g in packs([PrefillChunk(r, [1] * 16, 0, 6) for r in range(8)])] == [8]

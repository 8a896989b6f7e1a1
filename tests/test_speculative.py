"""Self-speculative decoding in the engine: drafts from a request's own early loops, verified at its last loop.

Greedy output must equal plain decoding token for token (every depth, fixed k and auto, beside plain
requests); after rejections the cache must hold what plain decoding wrote; sampled output must keep its
distribution.

    python -m pytest tests/test_speculative.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loopgpt.model import SamplingParams, generate_tokens, load_checkpoint
from loopgpt.server.engine.speculation import SpecRequest
from loopgpt.server.inprocess import InProcess

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
GREEDY = SamplingParams(temperature=0.0)
PROMPTS = ["Once upon a time", "She loved to play", "The little dog", "Lily ran and kicked", "Mom said", "One day"]


@pytest.fixture(scope="module")
def demo():
    model, tokenizer, _ = load_checkpoint(DEMO)
    return model, tokenizer


@pytest.mark.parametrize("spec", [SpecRequest(draft_loops=1, tokens=3), SpecRequest(draft_loops=2, tokens=2),
                                  SpecRequest(draft_loops=4, tokens=1), SpecRequest(auto=True)],
                         ids=["k1-m3", "k2-m2", "k4-m1", "auto"])
def test_greedy_speculative_equals_plain_at_every_depth_in_a_mixed_batch(demo, spec):
    model, tokenizer = demo
    engine = InProcess(model, tokenizer, 8, lanes_per_row=4, spec_batch_limit=64)  # auto drafts in this batch too
    try:
        waiters = []
        for n in range(1, model.config.max_loops + 1):
            ids = tokenizer.encode(PROMPTS[n - 1])
            waiters.append((ids, n, 24, engine.submit(ids, n, 24, speculative=spec)))
            waiters.append((ids, n, 12, engine.submit(ids, n, 12)))  # a plain request beside it
        for ids, n, m, w in waiters:
            assert w.done.wait(120) and w.finish.finish_reason == "length"
            with torch.inference_mode():
                assert w.tokens == list(generate_tokens(model, ids, n, m, GREEDY)), f"loops {n}"
        verified, accepted = engine.engine.drafts
        assert verified > 20 and 0 < accepted < verified  # drafts really ran, and some were rejected
    finally:
        engine.close()


def test_rejections_leave_the_cache_as_plain_decoding_wrote_it(demo):
    """Draft at k=1 (often rejected on the demo): once done, every slot of every decoded position holds the K/V
    plain decoding writes there."""
    model, tokenizer = demo
    ids, n, m = tokenizer.encode("Once upon a time, there was a little girl named Lily."), 6, 40
    caches, tokens, drafts = [], [], []
    for lanes, spec in ((1, None), (4, SpecRequest(draft_loops=1, tokens=3))):
        engine = InProcess(model, tokenizer, 1, lanes_per_row=lanes)
        try:
            w = engine.submit(ids, n, m, speculative=spec)
            assert w.done.wait(120)
            tokens.append(w.tokens)
            drafts.append(engine.engine.drafts)
            cache = engine.runner.cache
            written = len(ids) + m - 1  # the last token is sampled, never fed back
            caches.append((cache.k[:6 * 2, 0, :, :written].clone(), cache.v[:6 * 2, 0, :, :written].clone()))
        finally:
            engine.close()
    assert tokens[0] == tokens[1]
    assert drafts[1][0] > drafts[1][1] > 0, drafts  # drafts were verified, some rejected
    for plain, spec in zip(caches[0], caches[1], strict=True):
        torch.testing.assert_close(spec, plain, atol=1e-5, rtol=0)


@pytest.mark.slow  # 600 requests on the demo
def test_speculative_sampling_keeps_the_distribution(demo):
    """Temperature 1, 300 seeds: the second generated token (the first one a draft can stand in for) has the same
    distribution with and without speculation (two-sample chi-square over the likeliest tokens)."""
    model, tokenizer = demo
    ids = tokenizer.encode("Once upon a time, there was a")
    params = SamplingParams(temperature=1.0)
    counts = []
    for lanes, spec in ((1, None), (4, SpecRequest(draft_loops=1, tokens=3))):
        engine = InProcess(model, tokenizer, 8, lanes_per_row=lanes)
        try:
            waiters = [engine.submit(ids, 6, 3, speculative=spec, params=params, seed=s) for s in range(300)]
            assert all(w.done.wait(120) for w in waiters)
            assert lanes == 1 or engine.engine.drafts[0] > 200
            second = torch.tensor([w.tokens[1] for w in waiters])
            counts.append(torch.bincount(second, minlength=model.config.vocab_size))
        finally:
            engine.close()
    a, b = (c.double() for c in counts)
    top = torch.argsort(a + b, descending=True)[:6]  # the six likeliest second tokens, the rest pooled
    rest = torch.ones_like(a, dtype=torch.bool)
    rest[top] = False
    a = torch.cat([a[top], a[rest].sum()[None]])
    b = torch.cat([b[top], b[rest].sum()[None]])
    keep = (a + b) > 0
    chi2 = float((((a - b) ** 2) / (a + b))[keep].sum())  # equal sample sizes
    assert chi2 < 22.5, (chi2, a.tolist(), b.tolist())  # 0.999 quantile, 6 degrees of freedom


def test_auto_pauses_drafting_in_a_large_batch(demo):
    """Beyond `spec_batch_limit` tokens in flight, auto requests decode plainly (where drafting stops paying);
    fixed-k requests still draft."""
    model, tokenizer = demo
    ids = tokenizer.encode("Once upon a time")
    engine = InProcess(model, tokenizer, 8, lanes_per_row=4, spec_batch_limit=4)
    try:
        engine.generate([(ids, 6, 16)] * 8, speculative=SpecRequest(auto=True))
        assert engine.engine.drafts[0] == 0
        engine.generate([(ids, 6, 16)], speculative=SpecRequest(auto=True))  # alone: under the limit
        assert engine.engine.drafts[0] > 0
        before = engine.engine.drafts[0]
        engine.generate([(ids, 6, 16)] * 8, speculative=SpecRequest(draft_loops=2))
        assert engine.engine.drafts[0] > before
    finally:
        engine.close()

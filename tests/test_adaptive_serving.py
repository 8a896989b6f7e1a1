"""`loops: "auto"` in the engine: every token stops looping on its own, as model/adaptive.py evaluates it.

    python -m pytest tests/test_adaptive_serving.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loopgpt.model import SamplingParams, load_checkpoint
from loopgpt.model.adaptive import adaptive_hidden
from loopgpt.server.engine import Adaptive, Engine, ModelRunner, Request
from server_harness import Collector

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def demo():
    model, tokenizer, _ = load_checkpoint(DEMO)
    return model, tokenizer


@torch.inference_mode()
def oracle(model, prompt: list[int], n: int, tol: float, budget: int, min_loops: int) -> tuple[list[int], float]:
    """Greedy tokens of the adaptive policy by teacher forcing the whole sequence each token (adaptive_hidden
    equals token-by-token decoding), and the mean loops of the decoded tokens (the prefilled first one aside)."""
    seq, tokens = list(prompt), []
    for _ in range(n):
        h, used = adaptive_hidden(model, torch.tensor([seq]), tol, budget, min_loops)
        tokens.append(int(model.head(h[:, -1:])[0, 0].argmax()))
        seq.append(tokens[-1])
    decoded = used[0, len(prompt):len(prompt) + n - 1]
    return tokens, float(decoded.float().mean())


@pytest.mark.slow  # the oracle teacher-forces the whole sequence for every token, three times over
@pytest.mark.parametrize("tol, budget, min_loops", [(0.01, 6, 2), (0.05, 6, 1), (0.005, 12, 2)])
def test_adaptive_requests_decode_as_the_policy_says_beside_fixed_ones(demo, tol, budget, min_loops):
    model, tokenizer = demo
    engine = Engine(ModelRunner(model, 4), tokenizer)
    engine.start()
    try:
        auto = Adaptive(tol, min_loops, budget)
        specs = [("Once upon a time", auto, None), ("The little dog", None, 3),
                 ("She loved to play", auto, None), ("Mom said", None, 6)]
        collectors = []
        for prompt, adaptive, loops in specs:
            collectors.append(Collector())
            engine.submit(Request(tokenizer.encode(prompt), loops, 20, GREEDY, emit=collectors[-1], eos_token=-1,
                                  adaptive=adaptive))
        for c in collectors:
            c.finish()
    finally:
        engine.stop()
    for (prompt, adaptive, loops), c in zip(specs, collectors, strict=True):
        if adaptive is None:
            assert c.finish().loops_per_token == loops
            continue
        tokens, mean_loops = oracle(model, tokenizer.encode(prompt), 20, tol, budget, min_loops)
        assert c.tokens() == tokens, prompt
        assert c.finish().loops_per_token == pytest.approx(mean_loops)
        assert min_loops <= c.finish().loops_per_token <= budget
    used = [c.finish().loops_per_token for (_, a, _), c in zip(specs, collectors, strict=True) if a]
    assert min(used) < budget  # tokens really stopped early

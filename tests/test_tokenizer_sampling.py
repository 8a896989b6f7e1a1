"""Tokenizers (tiktoken gpt2 offline, our trained BPE) and per-request seeded sampling.

    python -m pytest tests/test_tokenizer_sampling.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from loopgpt.model import KVCache, SamplingParams, TextStream, generate_tokens, load_tokenizer
from loopgpt.model.sampling import filter_logits, sample, sample_row
from loopgpt.model.tokenizer import load_tokenizer as load_tok

HARD = ["", "Hello world", "naïve café", "日本語のテキスト", "한국어",
        "emoji 🙂👍🏽👨‍👩‍👧", "e\u0301 a\u0308 combining",
        "tabs\tand\nnewlines\r\n", "<|endoftext|> as text", "\x00\x7f control", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "مرحبا بالعالم"]


def test_gpt2_from_shared_cache():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_token == 50256


@pytest.mark.parametrize("text", HARD)
def test_trained_bpe_round_trips_hard_cases(bpe, text, tmp_path):
    assert bpe.decode(bpe.encode(text)) == text
    bpe.save(tmp_path)
    assert load_tok("bpe", tmp_path).encode(text) == bpe.encode(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_trained_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_stream_decoding_never_splits_a_character(bpe, text):
    stream = TextStream(bpe)
    pieces = [stream.push(t) for t in bpe.encode(text)] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_stop_strings_are_held_back_and_cut(bpe):
    stream = TextStream(bpe, stop=["The end"])
    out = ""
    for t in bpe.encode("She smiled. The end. More text"):
        out += stream.push(t)
        if stream.stopped:
            break
    assert stream.stopped and out == "She smiled. "


def kept(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> list[bool]:
    out = filter_logits(logits[None], torch.tensor([top_k]), torch.tensor([top_p]))[0]
    return torch.isfinite(out).tolist()


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert kept(logits, top_k=2) == [True, True, False, False, False]
    assert kept(logits, top_p=0.5) == [True, False, False, False, False]  # p(top) = 0.64 already crosses 0.5
    assert kept(logits, top_p=0.9) == [True, True, True, False, False]
    assert kept(logits, top_k=2, top_p=0.99) == [True, True, False, False, False]
    assert kept(logits, top_p=1e-300) == [True, False, False, False, False]  # the likeliest token always stays
    assert sample_row(logits, SamplingParams(temperature=0), 0, 0) == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))


@pytest.mark.parametrize("temperature", [1e-300, 1e-6, 0.0])
def test_a_temperature_below_the_floor_is_greedy(temperature):
    """Dividing logits by 1e-300 overflows float32 to inf/NaN; below 1e-5 sampling is greedy (vLLM's rule)."""
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    logits = torch.randn(64)
    assert all(sample_row(logits, params, seed, i) == int(logits.argmax()) for seed in range(3) for i in range(5))


def test_sampling_follows_the_distribution():
    """Counter-based noise: draws over counters 0..N-1 have the softmax's frequencies (chi-square, 7 dof)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 20000
    rows = logits.expand(n, -1)
    ones = torch.ones(n)
    tokens = sample(rows, ones, torch.zeros(n, dtype=torch.long), ones, torch.full((n,), 1234),
                    torch.arange(n))
    observed = torch.bincount(tokens, minlength=8).double()
    expected = torch.softmax(logits.double(), -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, chi2  # the 0.999 quantile of chi-square with 7 degrees of freedom


def test_a_row_samples_the_same_token_whatever_its_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    temp, top_k, top_p = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.9]), torch.tensor([0, 5, 0, 10, 0]), torch.full((5,), 0.95)
    seed, counter = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 7, 3, 9, 1])
    batch = sample(logits, temp, top_k, top_p, seed, counter)
    for i in range(5):
        alone = sample(logits[i:i + 1], temp[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], seed[i:i + 1], counter[i:i + 1])
        assert int(alone[0]) == int(batch[i])
    assert int(batch[2]) == int(logits[2].argmax())
    # no filter asked for: skipping the filter work must not change a draw
    plain = sample(logits, temp, torch.zeros(5, dtype=torch.long), torch.ones(5), seed, counter)
    assert plain.tolist() == sample(logits, temp, torch.zeros(5, dtype=torch.long), torch.ones(5), seed, counter,
                                    filtered=False).tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    """A seeded request decoded in a shared batch, beside other requests, equals its solo run."""
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=50)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    loops, seeds = [3, 1, 6], [7, 99, 1234]
    solo = list(generate_tokens(model, prompts[0], loops[0], 12, params, seed=seeds[0]))
    for neighbour_seed in (0, 1):
        cache = KVCache(model.config, 3, max_len=32, loops=6)
        row_seeds = [s if r == 0 else s + neighbour_seed for r, s in enumerate(seeds)]
        last = []
        with torch.no_grad():
            for r, p in enumerate(prompts):
                logits, _ = model(torch.tensor([p]), loops[r], kv_cache=cache, rows=torch.tensor([r]))
                last.append(logits[0, -1])
            out = []
            for i in range(12):
                toks = [sample_row(last[r], params, row_seeds[r], i) for r in range(3)]
                out.append(toks[0])
                logits, _ = model(torch.tensor(toks)[:, None], torch.tensor(loops), kv_cache=cache)
                last = list(logits[:, -1])
        assert out == solo


def test_speculative_acceptance_leaves_the_distribution_unchanged():
    """Draft from q, accept with min(1, p/q), else resample from max(p - q, 0): the tokens follow p exactly
    (chi-square over 20,000 draws), even with q far from p, and with top-k on (the same filter on both)."""
    from loopgpt.model.sampling import DRAFT, draw, tempered, verify

    target = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    proposal = torch.tensor([-1.0, 0.0, 2.5, 0.5, 1.0, -0.5, 1.5, 0.0])
    n = 20000
    ones, seed, counter = torch.ones(n), torch.full((n,), 99), torch.arange(n)
    for top_k in (0, 5):
        k = torch.full((n,), top_k)
        drafts = draw(tempered(proposal.expand(n, -1), ones, k, ones), seed, counter, DRAFT)
        tokens, accepted = verify(target.expand(n, -1), proposal.expand(n, -1), drafts, ones, k, ones, seed, counter)
        p = torch.softmax(tempered(target[None], ones[:1], k[:1], ones[:1])[0].double(), -1)
        observed = torch.bincount(tokens, minlength=8).double()
        keep = p > 0
        chi2 = float(((observed[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum())
        assert chi2 < 24.3, (top_k, chi2)  # 0.999 quantile, 7 degrees of freedom (fewer with top-k)
        assert observed[~keep].sum() == 0
        assert 0.2 < float(accepted.double().mean()) < 0.9  # the draft really was accepted some of the time


def test_greedy_verification_is_the_argmax():
    from loopgpt.model.sampling import verify

    target = torch.randn(6, 30)
    draft = torch.tensor([int(target[0].argmax()), 0, 1, int(target[3].argmax()), 2, 3])
    zero, k, one = torch.zeros(6), torch.zeros(6, dtype=torch.long), torch.ones(6)
    tokens, accepted = verify(target, torch.randn(6, 30), draft, zero, k, one, k, k)
    assert tokens.tolist() == target.argmax(-1).tolist()
    assert accepted.tolist() == (target.argmax(-1) == draft).tolist()


def test_token_stats_without_entropy_keeps_the_nll_and_marks_the_entropy_missing():
    import torch
    from loopgpt.model.sampling import token_stats

    logits = torch.randn(4, 1000) * 3
    tokens = torch.tensor([0, 5, 999, 17])
    nll, entropy = token_stats(logits, tokens)
    assert torch.allclose(nll, torch.nn.functional.cross_entropy(logits, tokens, reduction="none"), atol=1e-5)
    p = logits.softmax(-1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-4)
    cheap, none = token_stats(logits, tokens, entropy=False)
    assert torch.allclose(cheap, nll, atol=1e-5) and none.isnan().all()

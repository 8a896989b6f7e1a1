"""Tokenizers (tiktoken gpt2 offline, our trained BPE) and per-request seeded sampling.

    python -m pytest tests/test_tokenizer_sampling.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from loopgpt.model import KVCache, SamplingParams, TextStream, generate_tokens, load_tokenizer, make_generator
from loopgpt.model.sampling import filter_logits, sample_row
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


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert kept.tolist() == [True, True, False, False, False]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.5)))
    assert kept.tolist() == [True, False, False, False, False]  # p(top) = 0.64 already crosses 0.5
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.9)))
    assert kept.tolist() == [True, True, True, False, False]
    assert sample_row(logits, SamplingParams(temperature=0)) == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_same_seed_same_tokens_whatever_the_batch():
    """A seeded request decoded in a shared batch, beside other requests, equals its solo run."""
    model = tiny_model()
    params = SamplingParams(temperature=1.0, top_k=50)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    loops, seeds = [3, 1, 6], [7, 99, 1234]
    solo = list(generate_tokens(model, prompts[0], loops[0], 12, params, seed=seeds[0]))
    for neighbour_seed in (0, 1):
        cache = KVCache(model.config, 3, max_len=32, loops=6)
        gens = [make_generator(s if r == 0 else s + neighbour_seed) for r, s in enumerate(seeds)]
        last = []
        with torch.no_grad():
            for r, p in enumerate(prompts):
                logits, _ = model(torch.tensor([p]), loops[r], kv_cache=cache, rows=torch.tensor([r]))
                last.append(logits[0, -1])
            out = []
            for _ in range(12):
                toks = [sample_row(last[r], params, gens[r]) for r in range(3)]
                out.append(toks[0])
                logits, _ = model(torch.tensor(toks)[:, None], torch.tensor(loops), kv_cache=cache)
                last = list(logits[:, -1])
        assert out == solo

"""Per-token adaptive depth (model/adaptive.py) and KV sharing across loops, against simple oracles.

    python -m pytest tests/test_adaptive.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from loopgpt.model import KVCache, preset
from loopgpt.model.adaptive import (
    MEASURES,
    adaptive_hidden,
    check_adaptive,
    convergence,
    copy_exit_kv,
    exits,
)
from loopgpt.model.config import ConfigError
from loopgpt.model.forward import hidden
from loopgpt.model.kv_cache import CacheAccess, position_mask


def decode_adaptive(model, seq, tol, max_loops, min_loops=1, measure="hidden"):
    """The policy as a plain cached loop, one token at a time: (hidden (T, C), loops used (T,), values seen).

    Written out here with its own K/V copy (slot by slot), independent of adaptive_hidden and copy_exit_kv."""
    cfg = model.config
    T = seq.numel()
    cache = KVCache(cfg, 1, max_len=T, loops=max_loops)
    outs, used, values = [], [], []
    for t in range(T):
        pos = torch.tensor([[t]])
        x = model.embed(seq.view(1, T)[:, t : t + 1], pos)  # (1, 1, C)
        for n in range(max_loops):
            access = CacheAccess(cache, n, slice(0, 1), torch.tensor([0]), pos, t + 1, position_mask(pos, t + 1))
            new = model.loop_body(x, n, access)
            value = float(convergence(model, x, new, measure))
            x = new
            values.append(value)
            if n + 1 == max_loops or (n + 1 >= min_loops and value < tol):
                for deeper in range(n + 1, max_loops):
                    for i in range(cfg.n_layer):
                        for j in range(cfg.inner_loops):
                            src, dst = cfg.slot(n, i, j), cfg.slot(deeper, i, j)
                            cache.k[dst, 0, :, t] = cache.k[src, 0, :, t]
                            cache.v[dst, 0, :, t] = cache.v[src, 0, :, t]
                used.append(n + 1)
                break
        outs.append(x[0, 0])
    return torch.stack(outs), torch.tensor(used), values


@pytest.mark.parametrize("inner", [1, 2])
def test_tolerance_zero_is_the_fixed_depth_forward(inner):
    model = tiny_model(inner_loops=inner)
    seq = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        x, used = adaptive_hidden(model, seq, 0.0, max_loops=5)
        cached = hidden(model, seq, 5, KVCache(model.config, 3, max_len=20, loops=5))
        plain = hidden(model, seq, 5)
    assert (used == 5).all()
    assert torch.equal(x, cached)  # the same cached attention, bit for bit
    assert (x - plain).abs().max().item() <= 1e-5  # is_causal attention without a cache: rounding only


@pytest.mark.parametrize("measure,tol", [("hidden", 0.135), ("cosine", 0.004), ("kl", 0.05), ("entropy", 1.0)])
def test_adaptive_forward_equals_token_by_token_decoding(measure, tol):
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(40)  # a random head is nearly uniform: sharpen it so KL and entropy vary
    torch.manual_seed(0)
    seq = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        x, used = adaptive_hidden(model, seq, tol, max_loops=6, min_loops=2, measure=measure)
        for b in range(2):
            ref_x, ref_used, values = decode_adaptive(model, seq[b], tol, 6, 2, measure)
            # no value sits on the threshold, so rounding cannot flip a decision between the two orders of sums
            assert min(abs(v - tol) for v in values) > 1e-5
            assert torch.equal(used[b], ref_used)
            assert (x[b] - ref_x).abs().max().item() <= 1e-4
    # the tolerance was chosen so that tokens stop at several different depths, copies included
    assert len(set(used.flatten().tolist())) >= 3 and used.min() >= 2


@pytest.mark.parametrize("measure,tol", [("cosine", 0.004), ("kl", 0.05)])
def test_prefill_chunks_and_padding_through_a_serving_cache_equal_one_pass(measure, tol):
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(40)
    torch.manual_seed(0)
    seq = torch.randint(0, model.config.vocab_size, (2, 24))  # the sequences of the token-by-token test
    with torch.no_grad():
        whole, used = adaptive_hidden(model, seq, tol, 6, 2, measure)
        cache = KVCache(model.config, 4, max_len=24, loops=6)  # rows 0..2 serve, row 3 is the scratch row
        row = torch.tensor([2])
        a, ua = adaptive_hidden(model, seq[:1, :10], tol, 6, 2, measure, cache, row, scratch=3)
        cache.lengths[2] = 10
        b, ub = adaptive_hidden(model, seq[:1, 10:], tol, 6, 2, measure, cache, row, scratch=3)
        assert torch.equal(torch.cat([ua, ub], 1), used[:1])
        assert (torch.cat([a, b], 1) - whole[:1]).abs().max().item() <= 1e-5
        # two prompts in one padded forward: the short one's padding writes only to the scratch row
        cache.reset()
        idx = torch.stack([seq[0], torch.cat([seq[1, :15], torch.zeros(9, dtype=torch.long)])])
        pos = torch.stack([torch.arange(24), torch.arange(24).clamp(max=14)])
        write = torch.tensor([[0] * 24, [1] * 15 + [3] * 9])
        x, u = adaptive_hidden(model, idx, tol, 6, 2, measure, cache, torch.tensor([0, 1]), pos, write, scratch=3)
        assert torch.equal(u[0], used[0]) and torch.equal(u[1, :15], used[1, :15])
        assert (x[0] - whole[0]).abs().max().item() <= 1e-5 and (x[1, :15] - whole[1, :15]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="needs a scratch row and 6 loops"):
        adaptive_hidden(model, seq, tol, 6, kv_cache=cache)


def test_auto_never_exceeds_the_budget_and_respects_min_loops():
    model = tiny_model(seed=2)
    seq = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        for measure in MEASURES:
            for max_loops in (1, 3, 4, 9, model.config.loop_cap):
                _, used = adaptive_hidden(model, seq, 0.0, max_loops, measure=measure)
                assert (used == max_loops).all()  # never converged: the budget ends every token
                _, used = adaptive_hidden(model, seq, 0.3, max_loops, measure=measure)
                assert used.max() <= max_loops and used.min() >= 1
        _, used = adaptive_hidden(model, seq, 1e9, 6, min_loops=3)  # everything converged: stop at min_loops
        assert (used == 3).all()
    with pytest.raises(ValueError, match=r"max_loops must be in 1\.\.16"):
        adaptive_hidden(model, seq, 0.1, max_loops=17)
    with pytest.raises(ValueError, match="tolerance must be a finite number"):
        check_adaptive(model.config, float("nan"))
    with pytest.raises(ValueError, match=r"min_loops must be in 1\.\.4"):
        check_adaptive(model.config, 0.1, min_loops=5)
    with pytest.raises(ValueError, match="convergence measure must be one of"):
        check_adaptive(model.config, 0.1, measure="l2")


def test_convergence_measures_and_exit_rule():
    model = tiny_model()
    old, new = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    rel = convergence(model, old, new, "hidden")
    assert rel.shape == (3, 5) and torch.allclose(rel[1, 2], (new[1, 2] - old[1, 2]).norm() / new[1, 2].norm())
    assert (convergence(model, new, new, "hidden") == 0).all()
    cos = torch.dot(new[0, 1], old[0, 1]) / (new[0, 1].norm() * old[0, 1].norm())
    assert torch.allclose(convergence(model, old, new, "cosine")[0, 1], 1 - cos, atol=1e-6)
    assert (convergence(model, 3 * new, new, "cosine").abs() < 1e-6).all()  # a change of scale alone is no change
    assert (convergence(model, new, new, "kl").abs() < 1e-6).all()
    with torch.no_grad():
        p, q = torch.softmax(model.head(new), -1), torch.softmax(model.head(old), -1)
        kl = torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1)  # KL(p || q), p the newer
        assert torch.allclose(convergence(model, old, new, "kl"), kl, atol=1e-5)
        assert torch.allclose(convergence(model, old, new, "entropy"), -(p * p.log()).sum(-1), atol=1e-5)
    value = torch.tensor([0.0, 0.05, 0.2, 0.05])
    assert exits(value, 2, 0.1, min_loops=1, max_loops=4).tolist() == [True, True, False, True]
    assert exits(value, 2, 0.0, 1, 4).tolist() == [False] * 4  # strictly below: tol 0 never exits early
    assert exits(value, 1, 0.1, 2, 4).tolist() == [False] * 4  # min_loops first
    assert exits(value, 4, 0.1, 1, 4).all()  # the budget always ends a token


@pytest.mark.parametrize("budget", [0, 2])
def test_copy_exit_kv_fills_every_deeper_slot_and_nothing_else(budget):
    cfg = preset("tiny", inner_loops=2, kv_budget=budget)
    cache = KVCache(cfg, 3, max_len=8, loops=5)
    cache.k.normal_()
    cache.v.normal_()
    before_k, before_v = cache.k.clone(), cache.v.clone()
    copy_exit_kv(cache, torch.tensor([0, 2]), torch.tensor([3, 5]), 1, 5)
    copy_exit_kv(cache, 1, 7, 4, 5)  # exit at the last loop: nothing deeper to fill
    touched = torch.zeros_like(cache.k, dtype=torch.bool)
    for row, p in ((0, 3), (2, 5)):
        for n in range(2, 5):
            for i in range(cfg.n_layer):
                for j in range(cfg.inner_loops):
                    src, dst = cfg.slot(1, i, j), cfg.slot(n, i, j)
                    assert torch.equal(cache.k[dst, row, :, p], before_k[src, row, :, p])
                    assert torch.equal(cache.v[dst, row, :, p], before_v[src, row, :, p])
                    touched[dst, row, :, p] = True
    assert torch.equal(cache.k[~touched], before_k[~touched]) and torch.equal(cache.v[~touched], before_v[~touched])
    with pytest.raises(ValueError, match="exit loop 5"):
        copy_exit_kv(cache, 0, 0, 5, 5)


def test_kv_budget_override_is_a_validated_copy():
    cfg = preset("demo")
    shared = cfg.with_kv_budget(2)
    assert shared.kv_budget == 2 and cfg.kv_budget == 0 and shared.kv_slots(6) == 2 * cfg.n_layer
    assert shared.with_kv_budget(0).kv_slots(6) == 6 * cfg.n_layer
    assert {k: v for k, v in shared.to_dict().items() if k != "kv_budget"} == {
        k: v for k, v in cfg.to_dict().items() if k != "kv_budget"}
    for bad in (-1, 25, 1.5, True):
        with pytest.raises(ConfigError, match=r"kv_budget must be 0 \(one K/V slot per loop\) or 1\.\.24"):
            cfg.with_kv_budget(bad)


def test_adaptive_refuses_a_kv_budget():
    model = tiny_model(kv_budget=2)
    with pytest.raises(ValueError, match="needs one K/V slot per loop"):
        adaptive_hidden(model, torch.tensor([[1, 2, 3]]), 0.1)


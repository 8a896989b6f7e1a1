"""The model core against itself and against an independent oracle (Hugging Face GPT-2).

    python -m pytest tests/test_model.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from loopgpt.model import PRESETS, KVCache, LoopGPT, preset

TOL = 1e-4


def decode_with_cache(model, seq, prefill, loops, rows=None, cache=None):
    """Logits for every position of `seq` (B, T): prefill `prefill` tokens, then one token per step."""
    B, T = seq.shape
    cache = cache or KVCache(model.config, B, max_len=T, loops=max(int(torch.as_tensor(loops).max()), 1))
    out = [model(seq[:, :prefill], loops, kv_cache=cache, rows=rows)[0]]
    for t in range(prefill, T):
        out.append(model(seq[:, t : t + 1], loops, kv_cache=cache, rows=rows)[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("loops", [1, 2, 6])
@pytest.mark.parametrize("gate", ["none", "vector"])
@pytest.mark.parametrize("inner", [1, 2])
def test_cached_decode_equals_full_recompute(loops, gate, inner):
    model = tiny_model(gate=gate, inner_loops=inner)
    seq = torch.randint(0, model.config.vocab_size, (2, 8 + 16))
    with torch.no_grad():
        full, _ = model(seq, loops)
        cached = decode_with_cache(model, seq, 8, loops)
    assert (full - cached).abs().max().item() <= TOL


def to_hf(model: LoopGPT, loops: int):
    """A transformers GPT2LMHeadModel with n_layer * inner * loops layers holding our (shared) weights."""
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    depth = cfg.n_layer * cfg.inner_loops * loops
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=depth,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = model.state_dict()
    theirs = {"transformer.wte.weight": ours["transformer.wte.weight"],
              "transformer.wpe.weight": ours["transformer.wpe.weight"],
              "transformer.ln_f.weight": ours["transformer.ln_f.weight"],
              "transformer.ln_f.bias": ours["transformer.ln_f.bias"],
              "lm_head.weight": ours["lm_head.weight"]}
    for n in range(loops):
        for i in range(cfg.n_layer):
            for j in range(cfg.inner_loops):
                u = cfg.slot(n, i, j)  # the unrolled layer index equals the K/V slot index
                for name, tensor in ours.items():
                    prefix = f"transformer.h.{i}."
                    if name.startswith(prefix):
                        rest = name[len(prefix):]
                        # HF's Conv1D stores (in, out); nn.Linear stores (out, in).
                        t = tensor.t() if rest.endswith("weight") and ("c_attn" in rest or "c_proj" in rest
                                                                       or "c_fc" in rest) else tensor
                        theirs[f"transformer.h.{u}.{rest}"] = t
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    assert not unexpected and all(".attn.bias" in m or "masked_bias" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("layers,loops,inner", [(2, 3, 1), (1, 2, 1), (2, 2, 2)])
def test_matches_hugging_face_unrolled_gpt2(layers, loops, inner):
    model = tiny_model(gate="none", n_layer=layers, inner_loops=inner)
    hf = to_hf(model, loops)
    seq = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ours, _ = model(seq, loops)
        theirs = hf(seq).logits
        assert (ours - theirs).abs().max().item() <= TOL
        # with caches on both sides: prefill 12 tokens, then 8 single-token steps
        cached = decode_with_cache(model, seq, 12, loops)
        out = hf(seq[:, :12], use_cache=True)
        hf_logits, past = [out.logits], out.past_key_values
        for t in range(12, 20):
            out = hf(seq[:, t : t + 1], past_key_values=past, use_cache=True)
            hf_logits.append(out.logits)
            past = out.past_key_values
        assert (cached - torch.cat(hf_logits, dim=1)).abs().max().item() <= TOL


def test_all_ones_gate_equals_no_gate():
    gated = tiny_model(gate="vector")
    with torch.no_grad():
        gated.loop_gates.fill_(1.0)
    plain = LoopGPT(gated.config.__class__(**{**gated.config.to_dict(), "gate": "none"})).eval()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "loop_gates"})
    seq = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (gated(seq, 3)[0] - plain(seq, 3)[0]).abs().max().item() <= TOL


def test_zero_gate_is_an_identity_step():
    model = tiny_model(gate="vector")
    with torch.no_grad():
        model.loop_gates[0].zero_()  # a_1 = 0: loop 2 changes nothing
        seq = torch.randint(0, 512, (1, 10))
        assert torch.equal(model(seq, 1)[0], model(seq, 2)[0])


@pytest.mark.parametrize("cached", [False, True])
def test_per_row_loops_equal_each_row_alone(cached):
    model = tiny_model(gate="vector", inner_loops=2)
    seq = torch.randint(0, 512, (4, 12))
    row_loops = torch.tensor([1, 3, 6, 2])
    with torch.no_grad():
        if cached:
            batched = decode_with_cache(model, seq, 6, row_loops)
            alone = [decode_with_cache(model, seq[b : b + 1], 6, int(n)) for b, n in enumerate(row_loops)]
        else:
            batched = model(seq, row_loops)[0]
            alone = [model(seq[b : b + 1], int(n))[0] for b, n in enumerate(row_loops)]
    for b in range(4):
        assert (batched[b] - alone[b][0]).abs().max().item() <= TOL


def test_rows_of_a_shared_cache_are_independent():
    """Rows prefilled at different times and lengths, decoded together, match their solo runs."""
    model = tiny_model()
    cache = KVCache(model.config, 3, max_len=32, loops=6)
    seqs = [torch.randint(0, 512, (1, n)) for n in (5, 9, 3)]
    loops = torch.tensor([2, 6, 1])
    with torch.no_grad():
        for r, s in enumerate(seqs):
            model(s, int(loops[r]), kv_cache=cache, rows=torch.tensor([r]))
        nxt = torch.randint(0, 512, (3, 1))
        batched = model(nxt, loops, kv_cache=cache)[0]
        for r, s in enumerate(seqs):
            solo = model(torch.cat([s, nxt[r : r + 1]], dim=1), int(loops[r]))[0][:, -1]
            assert (batched[r, -1] - solo[0]).abs().max().item() <= TOL
    cache.reset([1])
    assert cache.lengths.tolist() == [6, 0, 4]


def test_loops_beyond_trained_reuse_last_gate_and_cap_is_enforced():
    model = tiny_model()
    seq = torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        model(seq, model.config.loop_cap)
    with pytest.raises(ValueError, match="loops must be in 1..16"):
        model(seq, model.config.loop_cap + 1)
    with pytest.raises(ValueError, match="loops must be in"):
        model(seq, 0)


@pytest.mark.parametrize("name,expected", [("gpt2-124m", 124e6), ("gpt2-81m-loop", 81e6),
                                           ("gpt2-67m-loop", 67e6), ("gpt2-45m", 45e6), ("gpt2-45m-loop", 45e6)])
def test_paper_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = LoopGPT(preset(name))
    assert abs(model.num_params() - expected) / expected <= 0.02
    assert name in PRESETS


def test_kv_budget_caps_slots():
    cfg = preset("tiny", kv_budget=2)
    assert cfg.kv_slots(6) == 2 * cfg.n_layer
    assert cfg.slot(3, 1, 0) == cfg.slot(1, 1, 0)
    model = tiny_model(kv_budget=2)
    seq = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        logits = decode_with_cache(model, seq, 4, 6)
    assert torch.isfinite(logits).all()

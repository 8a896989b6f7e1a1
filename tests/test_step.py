"""The continuous-depth decode step (model/step.py) against the reference forward.

Rows at different loop indices of different tokens share one loop application per step; every row's
logits must equal its solo full-depth cached decode, whatever its batch mates, padding or cache row.

    python -m pytest tests/test_step.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from loopgpt.model import KVCache
from loopgpt.model.step import OUT_FIELDS, StepState, decode_step, head_step, prefill

CONFIGS = {
    "gated": {},
    "inner-loops-2": {"inner_loops": 2},
    "no-gate": {"gate": "none"},
    "kv-budget-2": {"kv_budget": 2},
}


def solo_logits(model, prompt: list[int], loops: int, tokens: list[int]) -> list[torch.Tensor]:
    """Reference: the last-position logits after the prompt and after each of `tokens`, one row alone."""
    cache = KVCache(model.config, 1, loops=loops)
    out = [model(torch.tensor([prompt]), loops, kv_cache=cache)[0][0, -1]]
    for t in tokens:
        out.append(model(torch.tensor([[t]]), loops, kv_cache=cache)[0][0, -1])
    return out


def continuous_depth(model, prompts, loops, n_tokens, rows, pad_to=8):
    """Drive prefill + decode_step + head by hand, as the engine schedules them: every row advances one loop
    per step and is sampled (greedy) after its last. Returns each row's logits per token and its tokens."""
    R = max(rows) + 2
    scratch = R - 1
    cache = KVCache(model.config, R, loops=max(loops))
    state = StepState.allocate(R, R, model.config.n_embd, "cpu", torch.float32)  # one lane per row
    last = prefill(model, cache, state, rows, prompts, [0] * len(rows), loops, scratch)  # batched and padded
    state.hidden[torch.tensor(rows)] = last
    logits = {r: [model.head(last[i][None, None])[0, 0]] for i, r in enumerate(rows)}
    tokens = {r: [int(logits[r][0].argmax())] for r in rows}
    state.tokens[torch.tensor(rows)] = torch.tensor([tokens[r][0] for r in rows])
    pos = {r: len(p) for r, p in zip(rows, prompts, strict=True)}
    loop = dict.fromkeys(rows, 0)
    depth = dict(zip(rows, loops, strict=True))
    while any(len(tokens[r]) < n_tokens for r in rows):
        live = [r for r in rows if len(tokens[r]) < n_tokens]
        pad = pad_to - len(live)
        lanes = torch.tensor(live + [scratch] * pad)
        decode_step(model, cache, state, lanes, lanes, torch.tensor([pos[r] for r in live] + [0] * pad),
                    torch.tensor([loop[r] for r in live] + [0] * pad), ctx=model.config.block_size)
        done = [i for i, r in enumerate(live) if loop[r] == depth[r] - 1]
        for r in live:
            loop[r] += 1
        if done:
            h = torch.tensor([live[i] for i in done])
            one = torch.ones(len(done))
            zero = torch.zeros(len(done), dtype=torch.long)
            out = head_step(model, state, h, h, h, one * 0, zero, one, zero, zero)
            for j, i in enumerate(done):
                r = live[i]
                logits[r].append(model.head(state.hidden[r][None, None])[0, 0])
                tokens[r].append(int(out[j, OUT_FIELDS.index("token")]))
                assert int(state.tokens[r]) == tokens[r][-1]
                loop[r], pos[r] = 0, pos[r] + 1
    return logits, tokens


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.inference_mode()
def test_continuous_depth_step_equals_solo_decoding(name):
    model = tiny_model(block_size=64, **CONFIGS[name])
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8], [11, 4, 6, 2, 9, 9, 1, 0], [7]]
    loops = [3, 1, 9, 6]  # 9 > max_loops: the last gate is reused
    rows = [4, 0, 2, 5]  # scattered cache rows
    logits, tokens = continuous_depth(model, prompts, loops, 7, rows)
    for r, p, n in zip(rows, prompts, loops, strict=True):
        ref = solo_logits(model, p, n, tokens[r][:-1])
        assert [int(x.argmax()) for x in ref] == tokens[r], f"row {r} loops {n}"
        for i, (got, want) in enumerate(zip(logits[r], ref, strict=True)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"{name}: row {r} token {i}")


@torch.inference_mode()
def test_padding_rows_change_nothing():
    """The same rows padded to 4 or to 16 (padding reads and writes the scratch row) give identical tokens."""
    model = tiny_model(block_size=64)
    prompts, loops, rows = [[5, 9, 2], [3, 3, 8, 8]], [2, 5], [0, 1]
    a = continuous_depth(model, prompts, loops, 6, rows, pad_to=4)[1]
    b = continuous_depth(model, prompts, loops, 6, rows, pad_to=16)[1]
    assert a == b


@torch.inference_mode()
def test_head_step_flags_a_row_with_non_finite_logits_and_spares_the_others():
    model = tiny_model(block_size=64)
    state = StepState.allocate(3, 3, model.config.n_embd, "cpu", torch.float32)
    state.hidden.normal_()
    state.hidden[1, 0] = float("nan")  # one row's hidden state is broken
    one, zero, rows = torch.ones(3), torch.zeros(3, dtype=torch.long), torch.arange(3)
    out = head_step(model, state, rows, rows, rows, one, zero, one, rows, zero)
    finite = out[:, OUT_FIELDS.index("finite")].tolist()
    assert finite == [1.0, 0.0, 1.0]
    assert torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("budget, kept", [(0, [0, 1, 2, 3, 4, 5, 6]), (1, [0] * 7), (2, [0, 1, 1, 1, 1, 1, 1]),
                                          (3, [0, 1, 2, 1, 2, 1, 2])])
def test_kv_budget_keeps_loop_0_apart_on_the_host_and_on_the_device(budget, kept):
    """With a KV budget, loop 0 keeps its own slots and the deeper loops share the rest in turn; the engine's
    per-row slots (computed on the device) are the config's."""
    from loopgpt.model import preset
    from loopgpt.model.kv_cache import CacheAccess

    cfg = preset("tiny", inner_loops=2, kv_budget=budget, max_loops=7)
    assert [cfg.kept_loop(n) for n in range(7)] == kept
    cache = KVCache(cfg, 1, loops=7)
    loop = torch.arange(7)
    access = CacheAccess(cache, loop, torch.zeros(7, dtype=torch.long), torch.zeros(7, dtype=torch.long),
                         torch.zeros(7, 1, dtype=torch.long), 1, torch.ones(7, 1, 1, 1, dtype=torch.bool))
    assert access.base.tolist() == [cfg.slot(n, 0, 0) for n in range(7)]


def test_prefill_scores_only_the_chunks_with_targets():
    """Chunks batched in one prefill, some scored and some not: a scored chunk's NLL and table equal the reference
    log-softmax of its positions, whatever its neighbours (the table has one row per scored chunk, in order)."""
    torch.manual_seed(0)
    model = tiny_model()
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8], [6, 1, 2, 9, 9]]
    targets = [[], prompts[1][1:], prompts[2][1:]]  # the first chunk is not scored
    R = 4
    cache = KVCache(model.config, R, loops=3)
    state = StepState.allocate(R, R, model.config.n_embd, "cpu", torch.float32)
    scores: list[torch.Tensor] = []
    prefill(model, cache, state, [0, 1, 2], prompts, [0, 0, 0], [3, 2, 3], R - 1, targets, scores=scores)
    assert scores[0].shape[:2] == (2, 4)  # chunks 1 and 2; their longest target list
    for row, (p, loops) in enumerate(zip(prompts, [3, 2, 3], strict=True)):
        logp = torch.log_softmax(model(torch.tensor([p]), loops)[0][0].float(), dim=-1)  # (T, V)
        want = -logp[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        assert float(state.prompt_nll[row]) == pytest.approx(float(want.sum()) if targets[row] else 0.0, rel=1e-4)
        if targets[row]:
            table = scores[0][row - 1, :len(p) - 1, 0]
            assert torch.allclose(table, -want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gated", "kv-budget-2"])
@torch.inference_mode()
def test_a_span_of_consecutive_rows_reads_the_same_keys_as_their_gather(name):
    """decode_step's `span` (the engine passes it when the rows run up by one) reads the cache as a view: the
    new states and convergence values must equal the gathered read's, at every loop of a deep token."""
    model = tiny_model(block_size=64, **CONFIGS[name])
    rows, prompts = [1, 2, 3], [[5, 9, 2, 7, 1], [3, 3, 8], [11, 4, 6, 2]]
    runs = []
    for span in (None, slice(1, 4)):
        torch.manual_seed(0)
        cache = KVCache(model.config, 5, loops=4)
        state = StepState.allocate(5, 5, model.config.n_embd, "cpu", torch.float32)
        prefill(model, cache, state, rows, prompts, [0] * 3, [4] * 3, 4)
        lanes, pos = torch.tensor(rows), torch.tensor([len(p) for p in prompts])
        state.tokens[lanes] = torch.tensor([1, 2, 3])
        conv = [decode_step(model, cache, state, lanes, lanes, pos, loop, 64, span) for loop in range(4)]
        runs.append((state.hidden[lanes].clone(), torch.stack(conv)))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])
    assert decode_step(model, cache, state, lanes, lanes, pos, 0, 64, slice(1, 4), converge=False) is None

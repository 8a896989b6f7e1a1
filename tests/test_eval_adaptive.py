"""`loopgpt eval --loops auto` and `--kv-budget`: the evaluation paths against the fixed-depth one.

    python -m pytest tests/test_eval_adaptive.py -q
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import corpus
from loopgpt.model import load_checkpoint
from loopgpt.train.evaluate import (
    fixed_loss_at,
    kv_bytes_per_token,
    load_tokens,
    progress,
    sliding_nll,
    sliding_nll_adaptive,
    sliding_nll_decode,
)

from loopgpt.cli import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-data") / "stories.txt"
    path.write_text(corpus()[:3000])
    return path


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, text_file):
    model, tok, _ = load_checkpoint(tiny_checkpoint)
    return model, load_tokens(text_file, tok, max_tokens=300)


def test_adaptive_eval_spans_fixed_depths(tiny):
    model, ids = tiny
    deep, count = sliding_nll(model, ids, 3, context=40)
    shallow, _ = sliding_nll(model, ids, 1, context=40)
    total, n, loops = sliding_nll_adaptive(model, ids, 0.0, max_loops=3, context=40)
    assert n == count == len(ids) - 1 and loops == 3 * count and total == pytest.approx(deep, rel=1e-5)
    total, n, loops = sliding_nll_adaptive(model, ids, 1e9, max_loops=3, context=40)  # every token stops at once
    assert loops == count and total == pytest.approx(shallow, rel=1e-5)
    total, n, loops = sliding_nll_adaptive(model, ids, 0.12, max_loops=3, measure="hidden", context=40)
    assert count < loops < 3 * count  # tokens at several depths: only scored tokens' loops are counted


def test_decode_scoring_equals_teacher_forcing_without_a_budget_and_differs_with_one(tiny):
    model, ids = copy.deepcopy(tiny[0]), tiny[1]
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(20)  # a random head is nearly uniform: sharpen it so losses differ
    forced, count = sliding_nll(model, ids, 4, context=40)
    decoded, n = sliding_nll_decode(model, ids, 4, context=40)
    assert n == count and decoded == pytest.approx(forced, rel=1e-5)
    config = model.config
    model.config = config.with_kv_budget(1)
    shared, _ = sliding_nll_decode(model, ids, 4, context=40)
    # loops 0..2 read the earlier tokens' loop-3 K/V: far beyond the rounding between the two scorings
    assert abs(shared - forced) > 100 * max(abs(decoded - forced), 1e-4)
    assert kv_bytes_per_token(config, 4, torch.float32) == 2 * 4 * config.n_layer * config.n_embd * 4
    assert kv_bytes_per_token(config.with_kv_budget(1), 4, torch.bfloat16) == 2 * config.n_layer * config.n_embd * 2


def test_fixed_loss_interpolates_between_neighbouring_depths():
    curve = {1: 4.0, 2: 3.0, 3: 2.8}
    assert fixed_loss_at(curve, 1.0) == 4.0 and fixed_loss_at(curve, 3.0) == 2.8
    assert fixed_loss_at(curve, 1.25) == pytest.approx(3.75) and fixed_loss_at(curve, 2.5) == pytest.approx(2.9)


def test_eval_auto_cli_writes_table_json_and_plot(tiny_checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "auto.json"
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--max-tokens", "200",
            "--context", "40", "--loops", "auto", "--tolerance", "0,0.12,1e9", "--max-loops", "3",
            "--measure", "hidden", "--json", str(out), "--plot", str(tmp_path / "auto.png")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tolerance" in printed and "mean loops" in printed
    result = json.loads(out.read_text())
    fixed, auto = result["loops"], result["auto"]
    assert list(fixed) == ["1", "2", "3"] and list(auto) == ["0", "0.12", "1e+09"]
    assert auto["0"]["mean_loops"] == 3 and auto["0"]["loss"] == pytest.approx(fixed["3"]["loss"], abs=1e-5)
    assert auto["1e+09"]["mean_loops"] == 1 and auto["1e+09"]["loss"] == pytest.approx(fixed["1"]["loss"], abs=1e-5)
    row = auto["0.12"]
    assert 1 < row["mean_loops"] < 3 and result["measure"] == "hidden"
    assert row["delta"] == pytest.approx(row["loss"] - fixed_loss_at({1: fixed["1"]["loss"], 2: fixed["2"]["loss"],
                                                                      3: fixed["3"]["loss"]}, row["mean_loops"]),
                                         abs=2e-6)
    assert (tmp_path / "auto.png").stat().st_size > 1000


def test_eval_kv_budget_cli_scores_by_decoding(tiny_checkpoint, text_file, tmp_path, capsys):
    for budget in ("0", "2"):
        out = tmp_path / f"kv{budget}.json"
        assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(text_file), "--max-tokens", "120",
                     "--context", "40", "--loops", "4", "--kv-budget", budget, "--json", str(out)]) == 0
    none, two = (json.loads((tmp_path / f"kv{b}.json").read_text()) for b in ("0", "2"))
    assert none["kv_budget"] == 0 and two["kv_budget"] == 2 and two["scoring"] == "decode"
    assert none["loops"]["4"]["kv_bytes_per_token"] == 2 * two["loops"]["4"]["kv_bytes_per_token"]
    assert none["loops"]["4"]["loss"] != two["loops"]["4"]["loss"]
    assert "KV B/token" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--loops", "auto", "--tolerance", "0.1,x"], "--tolerance must be comma-separated numbers >= 0, got '0.1,x'"),
    (["--loops", "auto", "--tolerance", "-0.1"], "--tolerance must be comma-separated numbers >= 0, got '-0.1'"),
    (["--loops", "auto", "--tolerance", "0.1", "--max-loops", "17"],
     "--max-loops must be in 1..16 (the checkpoint's loop cap), got 17"),
    (["--loops", "auto", "--tolerance", "0.1", "--max-loops", "3", "--min-loops", "4"],
     "--min-loops must be in 1..3 (the budget), got 4"),
    (["--loops", "auto"], "--loops auto needs --tolerance"),
    (["--loops", "2", "--tolerance", "0.1"], "--tolerance, --max-loops, --min-loops and --measure need --loops auto"),
    (["--loops", "auto", "--tolerance", "0.1", "--kv-budget", "2"], "--kv-budget applies to fixed loop counts"),
    (["--loops", "4", "--kv-budget", "17"], "kv_budget must be 0 (one K/V slot per loop) or 1..16"),
])
def test_eval_flag_errors_are_one_sentence(flags, message, tiny_checkpoint, text_file, capsys):
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(text_file), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_progress_in_a_log_file_is_a_line_a_while_not_a_bar(capsys):
    """stderr is not a terminal here, as in a log file: no tqdm redraws, a plain line at most every `every_s`."""
    assert list(progress(list(range(4)), "eval loops=6", every_s=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" in ")[0] for line in lines] == [f"eval loops=6: {i}/4 batches" for i in range(1, 5)]
    assert list(progress(list(range(4)), "eval loops=6", every_s=3600)) == [0, 1, 2, 3]
    assert list(progress([7], "")) == [7] and capsys.readouterr().err == ""

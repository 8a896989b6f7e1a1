"""Training module: prepare → train → checkpoint → generate, exact resume, DDP equivalence, eval.

    python -m pytest tests/test_train.py -q
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import corpus
from loopgpt.model import load_checkpoint
from loopgpt.model.tokenizer import load_tokenizer
from loopgpt.train.data import sample_loops
from loopgpt.train.evaluate import load_tokens, sliding_nll
from loopgpt.train.prepare import prepare
from loopgpt.train.trainer import TrainConfig, train

FAST = dict(preset="tiny", batch_size=4, eval_interval=3, eval_batches=2, log_interval=1, warmup_steps=2,
            device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "corpus.txt"
    src.write_text(corpus()[:60_000], encoding="utf-8")
    prepare([str(src)], d / "tok", "train:400", split="eot", val_fraction=0.1)
    return d


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_prepared_bpe_round_trips_the_corpus_exactly(data_dir):
    tok = load_tokenizer("bpe", data_dir / "tok")
    meta = json.loads((data_dir / "tok" / "meta.json").read_text())
    ids = np.fromfile(data_dir / "tok" / "train.bin", dtype=np.uint16)
    assert meta["train_tokens"] == len(ids) and meta["vocab_size"] == tok.n_vocab == 400
    docs = (data_dir / "corpus.txt").read_text().split("<|endoftext|>")
    docs = [d.strip("\n") for d in docs if d.strip()][: meta["train_documents"]]
    assert tok.decode(ids.tolist()) == "".join(d + "<|endoftext|>" for d in docs)


def test_prepare_train_checkpoint_generate(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(data_dir / "tok"), out=str(out), max_steps=6, **FAST))
    assert result["step"] == 6 and (out / "loss.png").stat().st_size > 0
    model, tok, _ = load_checkpoint(out)
    assert model.config.vocab_size == 400 and model.config.extra["train"]["max_steps"] == 6
    proc = subprocess.run([sys.executable, "-m", "loopgpt.cli", "generate", "--checkpoint", str(out), "--prompt",
                           "Once upon", "--loops", "2", "--max-tokens", "8", "--seed", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Once upon"), proc.stderr


def test_resume_gives_the_same_loss_sequence(data_dir, tmp_path):
    common = dict(data=str(data_dir / "tok"), max_steps=8, dropout=0.1, loops_sampling="poisson-lognormal",
                  **FAST)
    common["model_overrides"] = {"dropout": 0.1}
    del common["dropout"]
    train(TrainConfig(out=str(tmp_path / "straight"), **common))
    # stop after 5 steps (a max_steps of 5 with the same schedule is not the same run: kill it via the
    # time budget instead, then resume from resume.pt)
    partial = tmp_path / "resumed"
    cfg = TrainConfig(out=str(partial), max_minutes=1e-9, **{k: v for k, v in common.items()})
    cfg.eval_interval = 1
    train(cfg)
    steps_done = len(losses(partial))
    assert steps_done == 1
    cfg2 = TrainConfig(out=str(partial), resume=True, **common)
    train(cfg2)
    assert losses(partial) == pytest.approx(losses(tmp_path / "straight"), abs=0, rel=0)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(data_dir, tmp_path):
    pytest.importorskip("torch.distributed.run")
    base = ["--data", str(data_dir / "tok"), "--preset", "tiny", "--max-steps", "4", "--eval-interval", "100",
            "--eval-batches", "1", "--log-interval", "1", "--device", "cpu", "--warmup-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "loopgpt.cli", "train", *base, "--out", str(tmp_path / "one"),
                          "--batch-size", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "loopgpt.cli", "train", *base, "--out", str(tmp_path / "two"), "--batch-size", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    # same global batch (4 rows), same rows: losses agree up to float reduction order
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)


def test_eval_is_deterministic_and_matches_direct_computation(data_dir, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(data_dir / "tok"), out=str(out), max_steps=3, **FAST))
    model, tok, _ = load_checkpoint(out)
    text = tmp_path / "tiny.txt"
    text.write_text("Once upon a time there was a cat.<|endoftext|>The cat sat on a mat and slept all day long.")
    ids = load_tokens(text, tok)
    assert ids.tolist()[-1] == tok.eot_token
    # a context larger than the file: one window, so the direct computation is one forward pass
    total, count = sliding_nll(model, ids, 2)
    with torch.no_grad():
        logits, _ = model(ids[None, :-1], 2)
        direct = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    assert count == len(ids) - 1 and total == pytest.approx(direct, rel=1e-5)
    # windows shorter than the file score every token once and give a finite, repeatable loss
    a = sliding_nll(model, ids, 2, context=8)
    assert a == sliding_nll(model, ids, 2, context=8) and a[1] == len(ids) - 1 and math.isfinite(a[0])
    proc = subprocess.run([sys.executable, "-m", "loopgpt.cli", "eval", "--checkpoint", str(out), "--data",
                           str(text), "--loops", "1,2", "--json", str(tmp_path / "e.json"), "--plot",
                           str(tmp_path / "e.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["loops"]["2"]["loss"] == pytest.approx(direct / count, rel=1e-5)
    shutil.rmtree(out)


def test_loop_samplers_draw_the_documented_depths():
    def draws(kind, n=4000, **kw):
        gen = torch.Generator().manual_seed(0)
        return [sample_loops(kind, 6, gen, cap=24, **kw) for _ in range(n)]

    assert set(draws("fixed", 50)) == {6}
    assert set(draws("uniform")) == set(range(1, 7))
    heavy = draws("max-heavy")
    assert set(heavy) == set(range(1, 7)) and heavy.count(6) / len(heavy) == pytest.approx(0.7, abs=0.03)
    huginn = draws("poisson-lognormal", mean=6)
    assert min(huginn) >= 1 and max(huginn) <= 24 and sum(huginn) / len(huginn) == pytest.approx(6, abs=0.3)
    over = draws("max-heavy", overflow=0.2, overflow_max=12)
    assert set(over) == set(range(1, 13))
    assert sum(n > 6 for n in over) / len(over) == pytest.approx(0.2, abs=0.02)
    # overflow 0 draws nothing extra: runs (and resume.pt files) from before the option keep their depths
    assert draws("uniform", 100) == draws("uniform", 100, overflow=0.0, overflow_max=12)


def test_init_from_fine_tunes_a_checkpoint_and_trains_past_max_loops(data_dir, tmp_path):
    base = tmp_path / "base"
    train(TrainConfig(data=str(data_dir / "tok"), out=str(base), max_steps=3, **FAST))
    # lr 0: the fine-tuned weights must be exactly the checkpoint's, so they were loaded, not re-initialised
    tuned = tmp_path / "tuned"
    cfg = TrainConfig(data=str(data_dir / "tok"), out=str(tuned), max_steps=6, init_from=str(base), lr=0.0,
                      min_lr=0.0, loops_overflow=0.5, **FAST)
    train(cfg)
    a, _, _ = load_checkpoint(base)
    b, _, _ = load_checkpoint(tuned)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    records = [json.loads(line) for line in (tuned / "log.jsonl").read_text().splitlines()]
    max_loops = a.config.max_loops
    assert max(r["loops"] for r in records) > max_loops and all(r["loops"] <= 2 * max_loops for r in records)
    assert "val_loss_overflow" in records[-1] and b.config.extra["train"]["loops_overflow_max"] == 2 * max_loops
    assert b.config.extra["train"]["init_from"] == str(base)
    # a tokenizer other than the data's, model flags, or an overflow depth outside the range: one sentence each
    other = tmp_path / "other"
    prepare([str(data_dir / "corpus.txt")], other, "train:300", split="eot", val_fraction=0.1)
    with pytest.raises(ValueError, match="tokenizer differs"):
        train(TrainConfig(data=str(other), out=str(tmp_path / "x"), max_steps=1, init_from=str(base), **FAST))
    with pytest.raises(ValueError, match="model config from the checkpoint"):
        train(TrainConfig(data=str(data_dir / "tok"), out=str(tmp_path / "x"), max_steps=1, init_from=str(base),
                          model_overrides={"dropout": 0.1}, **FAST))
    with pytest.raises(ValueError, match="--loops-overflow-max must be in 5..16"):
        train(TrainConfig(data=str(data_dir / "tok"), out=str(tmp_path / "x"), max_steps=1, loops_overflow=0.1,
                          loops_overflow_max=4, **FAST))


@pytest.mark.parametrize("args,message", [
    (["prepare", "--out", "x"], "give either --input FILE... or --hf-dataset NAME"),
    (["prepare", "--out", "x", "--input", "/no/such.txt"], "/no/such.txt: input file does not exist"),
    (["prepare", "--out", "x", "--input", __file__, "--tokenizer", "train:big"], "needs an integer vocabulary"),
    (["train", "--data", "/no/such", "--out", "x"], "meta.json: missing; make the data directory"),
    (["eval", "--checkpoint", "/no/such", "--data", __file__], "checkpoint directory does not exist"),
    (["train", "--data", "/no/such", "--out", "x", "--loops-overflow", "1.5"], "--loops-overflow must be in [0, 1)"),
])
def test_train_commands_fail_with_one_sentence(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loopgpt.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

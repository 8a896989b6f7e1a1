"""A real evaluation harness through the API: EleutherAI's lm-eval (its `local-completions` model, with the server's
own tokenizer through /tokenize, and `local-chat-completions`) runs the repository's held-out TinyStories tasks
(eval/tasks: a loglikelihood and a generate_until task) against `loopgpt serve` on the demo checkpoint, at loops 1
and at the trained maximum (the depth named in the model: `demo:loops=N`). Accuracy at the trained maximum is above
chance and not below loops 1. Offline: the datasets are built from ../shared at run time; nothing is downloaded.

    python -m pytest tests/test_lm_eval.py -q -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import HELDOUT, ROOT, needs_heldout
from server_harness import serve_process

TASKS = ROOT / "eval" / "tasks"
DOCS = 200

pytestmark = [pytest.mark.slow, needs_heldout]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    pytest.importorskip("lm_eval", reason='lm-eval is not installed (pip install -e ".[lm-eval]")')
    with serve_process(tmp_path_factory.mktemp("serve") / "serve.log", "--threads", "1", "--log-level",
                       "warning") as (url, _):
        yield url


def lm_eval(out: Path, model: str, model_args: list[str], tasks: list[str], *extra: str) -> dict:
    """The documented command (docs/evaluation.md, Through the API), run as a user runs it; its results JSON."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--include_path", str(TASKS), "--tasks", *tasks,
           "--model_args", *model_args, "--metadata", json.dumps({"heldout": str(HELDOUT), "docs": DOCS}),
           "--output_path", str(out), *extra]
    out.mkdir(parents=True)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = out.glob("*/results_*.json")
    return json.loads(results.read_text())["results"]


def test_lm_eval_scores_the_demo_at_loops_1_and_at_the_trained_maximum(serve, tmp_path, capsys):
    trained = httpx.get(f"{serve}/v1/models").json()["data"][0]["loops"]["trained"]
    scores = {}
    for loops in (1, trained):
        args = [f"model=demo:loops={loops}", f"base_url={serve}/v1/completions", "tokenizer_backend=remote",
                "max_length=256"]
        scores[loops] = lm_eval(tmp_path / f"loops{loops}", "local-completions", args,
                                ["tinystories_next", "tinystories_word"], "--batch_size", "16")
    chat = lm_eval(tmp_path / "chat", "local-chat-completions",
                   [f"model=demo:loops={trained}", f"base_url={serve}/v1/chat/completions", "num_concurrent=4"],
                   ["tinystories_word"], "--apply_chat_template", "--limit", "50")
    table = {n: (s["tinystories_next"]["acc,none"], s["tinystories_next"]["acc_norm,none"],
                 s["tinystories_word"]["exact_match,first_word"]) for n, s in scores.items()}
    with capsys.disabled():
        print(f"\nlm-eval on the demo ({DOCS} documents each): loops -> next-sentence acc, acc_norm; word exact match")
        for n, (acc, norm, word) in table.items():
            print(f"  loops {n:2}: {acc:.3f}  {norm:.3f}  {word:.3f}")
        print(f"  chat, loops {trained}: word exact match {chat['tinystories_word']['exact_match,first_word']:.3f}")
    (acc1, norm1, word1), (acc, norm, word) = table[1], table[trained]
    assert acc > 0.25 + 0.05 and norm > 0.25 + 0.05  # chance is 1/4 (three distractors)
    assert acc >= acc1 and norm >= norm1 and word >= word1 and word > 0
    assert 0 <= chat["tinystories_word"]["exact_match,first_word"] <= 1  # 50 chat requests answered and scored

"""Shared fixtures: a tiny trained-BPE tokenizer and a tiny random checkpoint, both on CPU.

    python -m pytest tests -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"  # beside the checkout: tokenizer cache and data (see README, Prerequisites)
HELDOUT = SHARED / "data" / "tinystories" / "heldout.txt"  # never trained on nor selected with
needs_heldout = pytest.mark.skipif(not HELDOUT.is_file(), reason=f"needs {HELDOUT} (../shared beside the checkout)")
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")
# A Ray cluster a test starts stays on loopback (Ray's single-node macOS/Windows mode); read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from loopgpt.model import LoopGPT, preset, save_checkpoint, train_bpe  # noqa: E402

TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big red ball in the park. \"Can I play with it?\" she asked her mom. "
    "Her mom smiled and said yes. Lily ran and kicked the ball high into the sky. The end.\n"
) * 20


def corpus() -> str:
    """Some real text: TinyStories' train split when shared/ is beside the checkout, else a fixed story."""
    path = SHARED / "data" / "tinystories" / "train.txt"
    return path.read_text(encoding="utf-8")[:200_000] if path.is_file() else TEXT


@pytest.fixture(scope="session")
def bpe():
    return train_bpe(corpus().split("<|endoftext|>"), 512)


def tiny_model(seed: int = 0, **overrides) -> LoopGPT:
    """A random tiny LoopGPT whose gates are perturbed away from 1 so the gate path is exercised."""
    torch.manual_seed(seed)
    model = LoopGPT(preset("tiny", **overrides))
    if model.loop_gates is not None:
        with torch.no_grad():
            model.loop_gates.uniform_(0.3, 1.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, bpe):
    directory = tmp_path_factory.mktemp("tiny-ckpt")
    model = tiny_model(vocab_size=bpe.n_vocab, eot_token=bpe.eot_token)
    evals = {"data": "synthetic", "loops": {str(n): {"loss": 6.0 - 0.1 * n, "ppl": 0.0} for n in range(1, 5)}}
    save_checkpoint(model, directory, bpe, eval_results=evals)
    return directory

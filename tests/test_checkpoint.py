"""Checkpoint round trip and every broken-checkpoint case, each with its sentence.

    python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from loopgpt.model import CheckpointError, load_checkpoint, resolve_device, save_checkpoint
from safetensors.torch import load_file, save_file


def test_round_trip_is_bit_exact(tiny_checkpoint, tmp_path):
    model, tokenizer, evals = load_checkpoint(tiny_checkpoint)
    save_checkpoint(model, tmp_path, tokenizer, eval_results=evals)
    again, tok2, evals2 = load_checkpoint(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.config == model.config and evals2 == evals
    assert tok2.encode("Once upon a time 🙂") == tokenizer.encode("Once upon a time 🙂")
    assert again.transformer.wte.weight is again.lm_head.weight


def broken(src, dst, mutate):
    shutil.copytree(src, dst)
    mutate(dst)
    return dst


def set_config(key, value, delete=False):
    def mutate(d):
        cfg = json.loads((d / "config.json").read_text())
        if delete:
            del cfg[key]
        else:
            cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return mutate


def drop_tensor(d):
    state = load_file(str(d / "model.safetensors"))
    del state["transformer.ln_f.weight"]
    save_file(state, str(d / "model.safetensors"))


CASES = {
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), r"model\.safetensors: weights file is missing"),
    "missing config": (lambda d: (d / "config.json").unlink(), r"config\.json: config file is missing"),
    "corrupt safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00garbage" * 10),
                            r"model\.safetensors: not a readable safetensors file"),
    "truncated safetensors": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), r"model\.safetensors: not a readable safetensors file"),
    "shape mismatch": (set_config("n_embd", 64), r"tensor .* has shape .*config\.json implies"),
    "unknown key": (set_config("n_experts", 8), r"config\.json: unknown config key\(s\) n_experts"),
    "missing key": (set_config("n_head", None, delete=True), r"config\.json: missing config key\(s\) n_head"),
    "bad value": (set_config("gate", "scalar"), r"config\.json: config gate must be one of none, vector"),
    "invalid json": (lambda d: (d / "config.json").write_text("{not json"), r"config\.json: not valid JSON"),
    "unknown tokenizer": (set_config("tokenizer", "klingon"), r"tokenizer 'klingon' cannot be loaded: unknown"),
    "missing tokenizer file": (lambda d: (d / "tokenizer.tiktoken").unlink(),
                               r"tokenizer\.tiktoken: tokenizer file is missing"),
    "missing tensor": (drop_tensor, r"missing tensor\(s\) transformer\.ln_f\.weight"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_fails_with_one_sentence(case, tiny_checkpoint, tmp_path):
    mutate, pattern = CASES[case]
    d = broken(tiny_checkpoint, tmp_path / "ckpt", mutate)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(d)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_half_precision_storage_loads_as_float32(tiny_checkpoint, tmp_path):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    save_checkpoint(model, tmp_path, tokenizer, dtype=torch.bfloat16)
    again, _, _ = load_checkpoint(tmp_path)
    assert again.lm_head.weight.dtype == torch.float32
    diff = (again.lm_head.weight - model.lm_head.weight).abs().max().item()
    assert 0 < diff < 1e-2


def test_resolve_device_names_what_is_usable():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda:", "cpu:0"):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match=f"--device {name} was asked for but torch sees no CUDA device"):
                resolve_device(name)

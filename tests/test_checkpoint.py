"""Checkpoint round trip and every broken-checkpoint case, each with its sentence.

    python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
import os
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


def poison(value):
    """One weight set to NaN or inf, as a diverged training run or a bit flip leaves it."""
    def mutate(d):
        state = load_file(str(d / "model.safetensors"))
        state["transformer.h.1.mlp.c_fc.weight"][3, 5] = value
        save_file(state, str(d / "model.safetensors"))
    return mutate


def write_eval(text):
    return lambda d: (d / "eval.json").write_text(text)


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
    # n_embd 1.2 M would need terabytes: refused from the file's header before anything is allocated.
    "absurd n_embd": (set_config("n_embd", 1_200_000),
                      r"tensor \S+ has shape \(\d+, 32\), config\.json implies \(\d+, 1200000\)"),
    "nan weight": (poison(float("nan")), r"tensor transformer\.h\.1\.mlp\.c_fc\.weight contains NaN or infinite"),
    "inf weight": (poison(float("-inf")), r"tensor transformer\.h\.1\.mlp\.c_fc\.weight contains NaN or infinite"),
    "eval.json wrong shape": (write_eval('{"loops": {"1": 3.0}}'), r"eval\.json: entry '1' is 3\.0, expected"),
    "eval.json not an object": (write_eval("[1, 2]"), r"eval\.json: expected \{\"loops\""),
    "eval.json loops not an object": (write_eval('{"loops": [3.0]}'), r"eval\.json: expected \{\"loops\""),
    "eval.json bad loops key": (write_eval('{"loops": {"one": {"loss": 3}}}'), r"eval\.json: entry 'one' is"),
    "eval.json loss not finite": (write_eval('{"loops": {"2": {"loss": NaN}}}'), r"eval\.json: entry '2' is"),
    "eval.json loss a string": (write_eval('{"loops": {"2": {"loss": "3.1"}}}'), r"eval\.json: entry '2' is"),
    "eval.json invalid": (write_eval("{"), r"eval\.json: not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_fails_with_one_sentence(case, tiny_checkpoint, tmp_path):
    mutate, pattern = CASES[case]
    d = broken(tiny_checkpoint, tmp_path / "ckpt", mutate)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(d)
    assert "\n" not in str(info.value)


def test_saved_weights_are_readable_as_any_file_open_writes(tiny_checkpoint, tmp_path):
    """safetensors writes 0600; a checkpoint must be readable by others (a container's non-root user)."""
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    (tmp_path / "plain").write_text("x")
    mode = os.stat(tmp_path / "ckpt" / "model.safetensors").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain").st_mode & 0o777  # 0666 less the umask: 0644 under umask 022


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

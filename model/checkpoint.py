"""Checkpoint I/O: a directory with model.safetensors, config.json, tokenizer files and eval.json.

Loading is strict (every tensor present with its shape, every config key known) and never
unpickles anything. Every failure is one CheckpointError sentence naming the file.

    python -c "from loopgpt.model import load_checkpoint; print(load_checkpoint('checkpoints/demo')[0].config)"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, LoopGPTConfig
from .gpt import LoopGPT
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EVAL = "eval.json"
TIED = "lm_head.weight"  # same tensor as transformer.wte.weight; stored once


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message names the file and the problem."""


def save_checkpoint(
    model: LoopGPT,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
    eval_results: dict | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k != TIED
    }
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(model.config.to_json() + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)
    if eval_results is not None:
        (directory / EVAL).write_text(json.dumps(eval_results, indent=2) + "\n")
    return directory


def load_config(directory: str | Path) -> LoopGPTConfig:
    path = Path(directory) / CONFIG
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: config file is missing")
    try:
        return LoopGPTConfig.from_dict(json.loads(path.read_text()), source=str(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except (ConfigError, TypeError) as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e


def resolve_device(name: str) -> str:
    """`auto` → cuda when torch sees one, else cpu; `cpu`, `cuda` or `cuda:N` as asked, if usable (ValueError
    otherwise)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if name in ("cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
        return name
    raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` → bfloat16 on a CUDA device that supports it, else float32; or the dtype named."""
    if name == "auto":
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_checkpoint(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[LoopGPT, Tokenizer, dict | None]:
    """(model in eval mode, tokenizer, eval.json contents or None)."""
    directory = Path(directory)
    config = load_config(directory)
    try:
        tokenizer = load_tokenizer(config.tokenizer, directory)
    except TokenizerError as e:
        raise CheckpointError(f"{directory / CONFIG}: tokenizer {config.tokenizer!r} cannot be loaded: {e}") from e
    if tokenizer.n_vocab > config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer has {tokenizer.n_vocab} tokens but config vocab_size is {config.vocab_size}"
        )
    model = LoopGPT(config)
    model.load_state_dict(_read_weights(directory / WEIGHTS, model), strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, load_eval(directory)


def _read_weights(path: Path, model: LoopGPT) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    expected = {k: v for k, v in model.state_dict().items() if k != TIED}
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])} for this config")
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unknown[:5])} for this config")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(v.shape)}"
            )
    state = {k: v.float() for k, v in state.items()}
    state[TIED] = state["transformer.wte.weight"]
    return state


def load_eval(directory: str | Path) -> dict | None:
    path = Path(directory) / EVAL
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e

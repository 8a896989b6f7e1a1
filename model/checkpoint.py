"""Checkpoint I/O: a directory with model.safetensors, config.json, tokenizer files and eval.json.

Loading is strict (every tensor present with its shape, every config key known) and never
unpickles anything. Every failure is one CheckpointError sentence naming the file.

    python -c "from loopgpt.model import load_checkpoint; print(load_checkpoint('checkpoints/demo')[0].config)"
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, LoopGPTConfig
from .gpt import LoopGPT
from .memory import check_memory
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
    # safetensors writes the file 0600; a checkpoint is meant to be read by others (the Docker image's
    # non-root user reading a mounted directory), so give it the mode open() would: 0666 less the umask.
    os.chmod(directory / WEIGHTS, 0o666 & ~_umask())
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


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16, from the kernel's CPU flags).
    Elsewhere bf16 is emulated and no faster than float32, so `--dtype auto` keeps float32."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no flags to read, no claim made
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` → bfloat16 on a CUDA device that supports it or a CPU with native bf16 matmul, else float32; or the
    dtype named. Logits, sampling and the NLL metrics stay float32 whatever the dtype."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if native_bf16_cpu() else torch.float32
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
    with torch.device("meta"):  # shapes only: nothing is allocated before the file and the budget are checked
        expected = {k: tuple(v.shape) for k, v in LoopGPT(config).state_dict().items() if k != TIED}
    _check_shapes(directory / WEIGHTS, expected)
    check_memory(config, device, weights=True, dtype_bytes=torch.finfo(dtype).bits // 8)
    evals = load_eval(directory)
    model = LoopGPT(config)
    model.load_state_dict(_read_weights(directory / WEIGHTS), strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, evals


def _check_shapes(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor present with the shape the config implies, read from the file's header alone."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    missing, unknown = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])} for this config")
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor(s) {', '.join(unknown[:5])} for this config")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {shapes[k]}, config.json implies {shape}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    for k, v in state.items():
        # A NaN or inf weight makes every forward produce NaN logits: refuse it here, not at the first request.
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: tensor {k} contains NaN or infinite values; the checkpoint is damaged")
    state = {k: v.float() for k, v in state.items()}
    state[TIED] = state["transformer.wte.weight"]
    return state


def load_eval(directory: str | Path) -> dict | None:
    """eval.json, checked: `{"loops": {"<n>": {"loss": <finite number>, ...}, ...}, ...}` (other keys free)."""
    path = Path(directory) / EVAL
    if not path.is_file():
        return None
    try:
        evals = json.loads(path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    shape = 'expected {"loops": {"1": {"loss": 3.1}, ...}}'
    if not isinstance(evals, dict) or not isinstance(evals.get("loops", {}), dict):
        raise CheckpointError(f"{path}: {shape}")
    for loops, row in evals.get("loops", {}).items():
        loss = row.get("loss") if isinstance(row, dict) else None
        if not (loops.isdigit() and int(loops) >= 1) or isinstance(loss, bool) or not isinstance(loss, int | float) \
                or not math.isfinite(loss):
            raise CheckpointError(f"{path}: entry {loops!r} is {json.dumps(row)[:80]}, {shape}")
    return evals


def _umask() -> int:
    """The process umask without setting it (os.umask would race other threads); Linux shows it in /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022

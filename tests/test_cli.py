"""`loopgpt generate` and `loopgpt info` as a user runs them: a real process, real exit codes.

    python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def loopgpt(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "loopgpt.cli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_generate_prints_a_completion(tiny_checkpoint):
    args = ("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "Once upon a time", "--loops", "3",
            "--seed", "1", "--max-tokens", "12")
    first, second = loopgpt(*args), loopgpt(*args)
    assert first.stdout.startswith("Once upon a time") and len(first.stdout) > len("Once upon a time\n")
    assert first.stdout == second.stdout  # same seed, same text
    assert "loops=3" in first.stderr and "finish_reason=" in first.stderr


def test_info_prints_config_params_and_loops(tiny_checkpoint):
    out = loopgpt("info", "--checkpoint", str(tiny_checkpoint)).stdout
    assert "parameters" in out and "loops        1..16 (trained up to 4" in out
    assert "n_layer" in out and "eval loss by loops" in out


def test_errors_are_one_sentence_and_non_zero(tiny_checkpoint, tmp_path):
    proc = loopgpt("info", "--checkpoint", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "checkpoint directory does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = loopgpt("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "hi", "--loops", "99",
                   "--max-tokens", "8", check=False)
    assert proc.returncode == 2 and "loops must be in 1..16" in proc.stderr and "Traceback" not in proc.stderr
    proc = loopgpt("generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "hi", "--max-tokens", "5000",
                   check=False)
    assert proc.returncode == 2 and "exceeds the context" in proc.stderr


def test_version():
    from loopgpt import __version__

    assert loopgpt("--version").stdout.strip() == f"loopgpt {__version__}"


def test_a_command_whose_extra_is_missing_names_the_extra():
    """An install without extras: `serve` says which extra to install instead of a traceback."""
    code = ("import sys; sys.modules['uvicorn'] = None; sys.modules['tqdm'] = None; "
            "from loopgpt.cli import main; sys.exit(main(sys.argv[1:]))")
    for args, extra in ((["serve", "--port", "1"], "server"), (["train", "--data", "x"], "train")):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f'pip install -e ".[{extra}]"' in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", code, "info", "--checkpoint", "/no/such"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "checkpoint directory does not exist" in proc.stderr


def test_a_module_missing_at_run_time_names_its_extra(tiny_checkpoint):
    """`loopgpt bench` with the loadtest extra but not transformers (row 1's baseline): one sentence, the extra."""
    code = ("import sys; sys.modules['transformers'] = None; "
            "from loopgpt.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--checkpoint", str(tiny_checkpoint), "--rows", "1",
                           "--reps", "1", "--tokens", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        'loopgpt bench: error: this needs transformers, which is not installed: pip install -e ".[bench]"')


def test_device_cuda_without_cuda_is_one_sentence(tiny_checkpoint):
    """One device rule (`loopgpt.model.resolve_device`) for generate and serve: exit 2, no traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for args in (("generate", "--prompt", "hi", "--max-tokens", "2"), ("serve", "--port", "1")):
        proc = loopgpt(args[0], "--checkpoint", str(tiny_checkpoint), "--device", "cuda", *args[1:], check=False)
        assert proc.returncode == 2 and "torch sees no CUDA device; use --device cpu" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_serve_bad_flags_exit_before_binding(tiny_checkpoint):
    for flags, message in ((("--prefill-chunk", "0"), "--prefill-chunk must be >= 1, got 0"),
                           (("--max-batch", "0"), "--max-batch must be >= 1, got 0"),
                           (("--port", "70000"), "--port must be in 0..65535")):
        proc = loopgpt("serve", "--checkpoint", str(tiny_checkpoint), *flags, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

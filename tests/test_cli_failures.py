"""Every way a command can fail ends with one sentence and a non-zero exit, never a traceback or a hang:
damaged checkpoints under `serve` and `generate`, bad flags, a closed pipe.

    python -m pytest tests/test_cli_failures.py -q
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time

import pytest
from loopgpt.server.options import RayOptions, ServerOptions, add_option_flags, env_name, options_from_args
from server_harness import free_port
from test_checkpoint import broken, poison, set_config, write_eval

from loopgpt.cli import main

PYTHON = [sys.executable, "-m", "loopgpt.cli"]

# The damaged checkpoints: each ran into a 503 forever (serve) or a traceback (generate).
DAMAGED = {
    "eval.json of the wrong shape": (write_eval('{"loops": {"1": 3.0}}'), "eval.json: entry '1' is 3.0, expected"),
    "loop_cap 10**9": (set_config("loop_cap", 10**9), "the KV cache needs "),  # the issue had 1e6: 6 TB on the demo
    "n_embd 1.2 M": (set_config("n_embd", 1_200_000), "config.json implies"),
    "NaN weights": (poison(float("nan")), "contains NaN or infinite values"),
}


def check_one_sentence(command: str, returncode: int, stderr: str, expected: str) -> str:
    """Exit 2 with `expected` in the last stderr line, and no traceback; returns that line."""
    last = (stderr.strip().splitlines() or [""])[-1]
    assert returncode == 2, (returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    assert expected in last and last.startswith(f"loopgpt {command}: error: "), last
    return last


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """`loopgpt ARGV` in this process (the same `main`, without paying a torch import per case): an exception
    that escaped main would fail the test, as a traceback would fail the user."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_serve_exits_2_with_one_sentence_on_a_damaged_checkpoint(case, tiny_checkpoint, tmp_path):
    """A real process: before the fix it stayed at 503 "model is loading" forever."""
    mutate, expected = DAMAGED[case]
    ckpt = broken(tiny_checkpoint, tmp_path / "ckpt", mutate)
    start = time.monotonic()
    proc = subprocess.run([*PYTHON, "serve", "--checkpoint", str(ckpt), "--port", str(free_port()), "--threads", "1",
                           "--log-level", "warning"], capture_output=True, text=True, timeout=60)  # a hang fails here
    line = check_one_sentence("serve", proc.returncode, proc.stderr, expected)
    assert time.monotonic() - start < 30  # a few seconds alone; generous for a loaded 2-core CI box
    if "loop_cap" in case:
        assert line.endswith("lower --max-batch, --loop-cap, --max-context, --kv-budget or --prefix-cache-mb")


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_generate_exits_2_with_one_sentence_on_a_damaged_checkpoint(case, tiny_checkpoint, tmp_path, capsys):
    mutate, expected = DAMAGED[case]
    ckpt = broken(tiny_checkpoint, tmp_path / "ckpt", mutate)
    # generate sizes its cache by the loops it runs: the huge loop_cap bites when a request asks for it.
    loops = ["--loops", str(10**9)] if "loop_cap" in case else []
    code, out, err = run_main(capsys, "generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-tokens", "4",
                              *loops)
    line = check_one_sentence("generate", code, err, expected)
    assert out == ""
    if "loop_cap" in case:
        assert line.endswith("lower --loops or --max-tokens")


@pytest.mark.parametrize("loops", ["0", "-1", "99"])
def test_generate_refuses_bad_loops_before_writing_anything(loops, tiny_checkpoint, capsys):
    code, out, err = run_main(capsys, "generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "Once upon",
                              "--loops", loops, "--max-tokens", "4")
    check_one_sentence("generate", code, err, "loops must be")
    assert out == ""  # the prompt was not echoed before the error


def test_a_closed_pipe_ends_quietly(tiny_checkpoint):
    """`loopgpt info | head -0`: the reader is gone before the first write; exit as SIGPIPE would, silently.
    (Every command returns through the same `main`, which handles it.)"""
    proc = subprocess.Popen([*PYTHON, "info", "--checkpoint", str(tiny_checkpoint)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


def test_serve_flags_are_the_options_dataclass():
    """Each default is written once, in ServerOptions: the parsed defaults are the dataclass's own."""
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    assert options_from_args(parser.parse_args([])) == ServerOptions()
    parsed = options_from_args(parser.parse_args(["--max-batch", "3", "--prompt-nll", "0", "--loop-cap", "9"]))
    assert (parsed.max_batch, parsed.prompt_nll, parsed.loop_cap) == (3, 0.0, 9)
    help_text = parser.format_help()
    for flag in ("--max-batch", "--max-queue", "--max-body", "--shutdown-grace", "--prefill-chunk", "--threads",
                 "--prompt-nll", "--api-key", "--api-key-file", "--loop-cap", "--max-context", "--host", "--port",
                 "--backend", "--device", "--log-level", "--checkpoint"):
        assert flag in help_text, flag


def test_every_serve_flag_has_its_variable_and_the_flag_wins(monkeypatch):
    """LOOPGPT_<FLAG> sets any serve setting; a flag typed on the command line beats it; an empty one is unset."""
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    add_option_flags(parser, RayOptions)
    for cls in (ServerOptions, RayOptions):
        for f in dataclasses.fields(cls):
            assert f"env {env_name(f.name)}" in " ".join(parser.format_help().split()), f.name
    monkeypatch.setenv("LOOPGPT_MAX_BATCH", "3")
    monkeypatch.setenv("LOOPGPT_DEVICE", "cpu")
    monkeypatch.setenv("LOOPGPT_COMPILE", "yes")
    monkeypatch.setenv("LOOPGPT_HOST", "")
    monkeypatch.setenv("LOOPGPT_REPLICAS", "2")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    args = parser.parse_args(["--device", "auto"])
    options = options_from_args(args)
    assert (options.max_batch, options.device, options.compile, options.host) == (3, "auto", True, "127.0.0.1")
    assert args.max_batch == 3  # written back: code reading args sees what the options hold
    ray = options_from_args(args, RayOptions)
    assert (ray.replicas, ray.ray_address, ray.ray) == (2, "auto", False)


@pytest.mark.parametrize("variable, value, message", [
    ("LOOPGPT_MAX_BATCH", "many", "$LOOPGPT_MAX_BATCH must be an integer, got 'many'"),
    ("LOOPGPT_MAX_BATCH", "0", "--max-batch must be >= 1, got 0 (from $LOOPGPT_MAX_BATCH)"),
    ("LOOPGPT_PROMPT_NLL", "half", "$LOOPGPT_PROMPT_NLL must be a number, got 'half'"),
    ("LOOPGPT_DEVICE", "tpu", "$LOOPGPT_DEVICE must be one of auto, cpu, cuda, got 'tpu'"),
    ("LOOPGPT_CUDA_GRAPHS", "maybe", "$LOOPGPT_CUDA_GRAPHS must be one of 1, true, yes, on, 0, false, no, off"),
    ("LOOPGPT_AUTOSCALE", "3", "--autoscale takes MIN:MAX replica counts such as 1:4, got '3'"),
])
def test_serve_bad_variable_is_one_sentence_naming_it(variable, value, message, tiny_checkpoint, monkeypatch,
                                                      capsys):
    monkeypatch.setenv(variable, value)
    flags = ["--ray"] if variable == "LOOPGPT_AUTOSCALE" else []
    code, _, err = run_main(capsys, "serve", "--checkpoint", str(tiny_checkpoint), "--port", "1", *flags)
    check_one_sentence("serve", code, err, message)


def test_api_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOPGPT_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert ServerOptions(api_key_file=str(key)).api_key == "s3cret"
    for options, message in (({"api_key_file": str(key), "api_key": "x"}, "not both"),
                             ({"api_key_file": str(tmp_path / "none")}, "cannot read it"),
                             ({"api_key_file": str(tmp_path / "empty")}, "the file is empty")):
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ValueError, match=message):
            ServerOptions(**options)


def test_serve_bad_key_file_exits_before_binding(tmp_path, capsys):
    code, _, err = run_main(capsys, "serve", "--api-key-file", str(tmp_path / "nope"), "--port", "1")
    check_one_sentence("serve", code, err, "cannot read it")

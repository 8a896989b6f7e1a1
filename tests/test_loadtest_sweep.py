"""The benchmark checkpoint, `loopgpt loadtest --sweep / --mixed / --prompt-tokens` against a real server, the
server's CPU seconds, `loopgpt bench` on several checkpoints, and scripts/perf_sweep.sh.

    python -m pytest tests/test_loadtest_sweep.py -q
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from loopgpt.loadtest.probe import cpu_seconds, parse_token_range
from loopgpt.loadtest.stats import RequestRecord
from loopgpt.loadtest.sweep import Level, parse_levels, sweep_table
from loopgpt.model import load_checkpoint, load_tokenizer, preset
from loopgpt.model.tokenizer import TokenizerError
from server_harness import running_server

from loopgpt.cli import main


def gpt2_available() -> bool:
    try:
        load_tokenizer("gpt2")
    except TokenizerError:
        return False
    return True


needs_gpt2 = pytest.mark.skipif(not gpt2_available(), reason="the gpt2 encoding is not in the tiktoken cache "
                                "(../shared/tiktoken-cache or TIKTOKEN_CACHE_DIR) and this machine is offline")


# ---------------------------------------------------------------- the benchmark checkpoint

@needs_gpt2
def test_bench_checkpoint_has_the_demo_shape_and_gpt2_vocabulary(tmp_path, capsys):
    out = tmp_path / "gpt2-vocab"
    assert main(["bench-checkpoint", "--out", str(out)]) == 0
    assert "50257" in capsys.readouterr().out
    model, tokenizer, evals = load_checkpoint(out)
    cfg, demo = model.config, preset("demo")
    assert (cfg.vocab_size, cfg.tokenizer, cfg.eot_token, cfg.gate, cfg.block_size) == (50257, "gpt2", 50256,
                                                                                        "none", 512)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_loops) == (demo.n_layer, demo.n_head, demo.n_embd,
                                                                    demo.max_loops)
    assert tokenizer.n_vocab == 50257 and evals is None
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
    # a second run refuses to overwrite it, in one sentence
    before = (out / "model.safetensors").read_bytes()
    assert main(["bench-checkpoint", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and err.count("\n") == 1
    assert (out / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------- pure parts

def test_cpu_seconds_sums_both_series_and_says_none_when_absent():
    both = ("# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 1.5\n"
            "# TYPE loopgpt_engine_cpu_seconds counter\nloopgpt_engine_cpu_seconds_total{pid=\"7\"} 2.25\n"
            "# TYPE loopgpt_requests counter\nloopgpt_requests_total 9\n")
    assert cpu_seconds(both) == 3.75
    assert cpu_seconds("# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 4\n") == 4.0  # no engine's
    assert cpu_seconds("# TYPE loopgpt_requests counter\nloopgpt_requests_total 9\n") is None


def test_levels_and_token_ranges_parse():
    assert parse_levels("1,4, 16,32") == [1, 4, 16, 32]
    assert parse_token_range("32:64") == (32, 64) and parse_token_range("48") == (48, 48)
    for bad in ("", "0,1", "a"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_levels(bad)
    for bad in ("9:3", "0", "x:4"):
        with pytest.raises(ValueError, match="--prompt-tokens"):
            parse_token_range(bad)


def test_sweep_table_rates_cores_and_ratio_to_the_first_level():
    def level(concurrency: int, tokens: int, cpu: float | None) -> Level:
        records = [RequestRecord(loops=6, start=0, status=200, ttft=0.1, itls=[0.01, 0.03], e2e=0.2, tokens=tokens,
                                 prompt_tokens=40, finish_reason="length")] * concurrency
        return Level(concurrency, {6: 1.0}, records, duration=2.0, wall=2.5, cpu_seconds=cpu)

    lines = sweep_table([level(1, 64, 1.0), level(4, 64, None)]).splitlines()
    assert lines[2] == "| 1 | 6 | 1 (0) | 32.0 | 1.00 | 100 / 100 | 20 / 30 | 0.40 | 40-40 |"
    assert lines[3] == "| 4 | 6 | 4 (0) | 128.0 | 4.00 | 100 / 100 | 20 / 30 | - | 40-40 |"  # no CPU figure: "-"


def test_loadtest_package_has_no_import_circle():
    """Every `from .x import` in loadtest/, at module level or inside functions: the graph has no cycle."""
    package = ROOT / "loadtest"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[path.stem] = {node.module.split(".")[0] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import circle: {' -> '.join(trail + (name,))}"
        for dep in graph.get(name, ()):
            visit(dep, trail + (name,))

    for name in graph:
        visit(name, ())


# ---------------------------------------------------------------- against a real server

@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=4) as (url, _):
        yield url


def test_sweep_runs_each_level_with_sized_prompts_and_server_cpu(server, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main(["loadtest", "--url", server, "--endpoint", "completions", "--sweep", "1,3", "--rounds", "2",
                 "--loops", "2", "--max-tokens", "5", "--temperature", "0", "--ignore-eos", "--prompt-tokens",
                 "12:20", "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| streams | loops |" in printed and "\n| 1 | 2 | 2 (0) |" in printed and "\n| 3 | 2 | 6 (0) |" in printed
    data = json.loads(out.read_text())
    assert [(lv["concurrency"], lv["overall"]["requests"]) for lv in data["levels"]] == [(1, 2), (3, 6)]
    for lv in data["levels"]:
        assert lv["overall"]["ok"] == lv["overall"]["requests"]
        # ignore_eos: every request generates exactly max_tokens, counted from the usage chunk
        assert {r["tokens"] for r in lv["requests"]} == {5} and {r["finish_reason"] for r in lv["requests"]} == {
            "length"}
        assert all(len(r["itls"]) == 4 for r in lv["requests"])  # one chunk per token, empty text or not
        # windows of 12-20 tokens, turned into text and re-tokenized by the server: a window's edges can re-merge
        assert all(10 <= r["prompt_tokens"] <= 20 for r in lv["requests"])
        # the server is in this process (a thread), so its CPU is ours: some, and at most every core
        assert 0 < lv["cpu_cores"] <= os.cpu_count() + 0.5
    assert data["config"]["ignore_eos"] is True and data["mixed"] == []


def test_mixed_compares_the_depth_mix_with_all_at_six(server, tmp_path, capsys):
    out = tmp_path / "mixed.json"
    assert main(["loadtest", "--url", server, "--endpoint", "completions", "--concurrency", "2", "--rounds", "2",
                 "--max-tokens", "4", "--temperature", "0", "--ignore-eos", "--mixed", "--quiet",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gain (theory 1.85x)" in printed
    data = json.loads(out.read_text())
    assert [lv["loops"] for lv in data["levels"]] == ["1,2,4,6", "6"]
    assert {r["loops"] for r in data["levels"][1]["requests"]} == {6}
    assert {r["loops"] for r in data["levels"][0]["requests"]} <= {1, 2, 4, 6}
    (pair,) = data["mixed"]
    mixed, deep = (lv["overall"]["tokens_per_s"] for lv in data["levels"])
    assert pair["concurrency"] == 2 and pair["gain"] == pytest.approx(mixed / deep)
    assert pair["theory"] == pytest.approx(6 / 3.25)  # max / mean loops


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "1", "--sweep", "1,x"], "--sweep takes concurrency levels"),
    (["--rounds", "1", "--mixed", "--loops", "2"], "--mixed sets the loops itself"),
    (["--requests", "2", "--rate", "2", "--mixed"], "--mixed sets the loops itself"),
    (["--rounds", "1", "--sweep", "1", "--plot", "x.png"], "--plot draws one run's loops"),
    (["--rounds", "1", "--prompt-tokens", "9:3"], "--prompt-tokens needs 1 <= low <= high"),
])
def test_bad_sweep_flags_are_one_sentence(server, flags, message, capsys):
    assert main(["loadtest", "--url", server, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_rounds_must_be_positive_and_closed_loop(server, capsys):
    assert main(["loadtest", "--url", server, "--rounds", "0"]) == 2
    assert main(["loadtest", "--url", server, "--rounds", "2", "--rate", "3"]) == 2
    assert capsys.readouterr().err.count("--rounds takes a count >= 1") == 2


def test_prompt_tokens_without_a_tokenize_route_is_one_sentence(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["loadtest", "--url", f"http://127.0.0.1:{port}", "--requests", "1", "--prompt-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-tokens needs the server's /tokenize" in err and err.count("\n") == 1


# ---------------------------------------------------------------- loopgpt bench on several checkpoints

def test_bench_runs_every_row_on_each_checkpoint_with_its_dtype(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    second = tmp_path / "second"
    second.mkdir()
    for f in Path(tiny_checkpoint).iterdir():
        (second / f.name).write_bytes(f.read_bytes())
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(second), "--rows", "1",
                 "--reps", "1", "--tokens", "4", "--dtype", "bfloat16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["checkpoints"] == [str(tiny_checkpoint), str(second)]
    assert [(r["row"], r["checkpoint"], r["dtype"]) for r in data["rows"]] == [
        (1, str(tiny_checkpoint), "bfloat16"), (1, str(second), "bfloat16")]
    assert all(r["ratio"] > 0 for r in data["rows"])


def test_bench_onnx_dir_names_one_checkpoint(tiny_checkpoint, capsys):
    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(tiny_checkpoint), "--rows", "5",
                 "--onnx", "somewhere"]) == 2
    assert "give a single --checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- scripts/perf_sweep.sh, tiny

@needs_gpt2
@pytest.mark.slow
@pytest.mark.timeout(600)  # two servers and two bench rows on a shared 2-core machine: about 2 minutes
def test_perf_sweep_script_prints_the_tables_and_stops_its_servers(tiny_checkpoint):
    env = {**os.environ, "DEMO": str(tiny_checkpoint), "SWEEP": "1,2", "LOOPS": "2", "ROUNDS": "1", "TOKENS": "4",
           "PROMPT_TOKENS": "8:12", "MIXED_STREAMS": "2", "BENCH_ROWS": "1", "BENCH_REPS": "1",
           "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "perf_sweep.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-2000:]
    name = Path(tiny_checkpoint).name
    for heading in (f"## {name}: closed-loop sweep at loops 2", f"## {name}: mixed depth, 2 streams",
                    "## gpt2-vocab: closed-loop sweep at loops 2", "## gpt2-vocab: mixed depth, 2 streams",
                    "## loopgpt bench --rows 1"):
        assert heading in stdout
    assert stdout.count("\n| 2 | 2 | 2 (0) |") == 2  # the sweep's second level, on each checkpoint
    assert "on gpt2-vocab at" in stdout  # bench ran on the built checkpoint too
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # nothing of the script's session is left: the servers were stopped
        os.killpg(proc.pid, 0)

"""ONNX export: both forms against PyTorch fp32 (prefill + cached decode), the onnxruntime runner, the CLI.

One export of the tiny checkpoint is shared by the module (it takes ~30 s on a busy CPU).

    python -m pytest tests/test_export.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from conftest import tiny_model  # noqa: E402
from loopgpt.export import ExportError, export_onnx, load_onnx  # noqa: E402
from loopgpt.export.bench import decode_tokens_per_s  # noqa: E402
from loopgpt.export.onnx_export import sha256  # noqa: E402
from loopgpt.export.parity import verify_export  # noqa: E402
from loopgpt.model import KVCache, SamplingParams, generate_tokens, load_checkpoint  # noqa: E402

from loopgpt.cli import main  # noqa: E402

TOL = 1e-4
DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-onnx")
    lines: list[str] = []
    manifest = export_onnx(tiny_checkpoint, out, verify=True, log=lines.append)
    return out, manifest, lines


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]


@pytest.fixture(scope="module")
def runner(exported):
    return load_onnx(exported[0], threads=1)[0]


def test_manifest_and_self_contained_dir(exported, tiny_checkpoint, model):
    out, manifest, lines = exported
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["opset"] == 23
    assert manifest["source"]["model_sha256"] == sha256(Path(tiny_checkpoint) / "model.safetensors")
    assert manifest["loops"] == {"min": 1, "trained": 4, "cap": 16, "inner": 1, "rule": manifest["loops"]["rule"]}
    assert manifest["verify"]["max_abs_diff"] <= TOL and len(manifest["verify"]["cases"]) == 13
    body = manifest["graphs"]["loop_body"]
    assert [i["name"] for i in body["inputs"]] == ["x", "pos", "loop", "past_k", "past_v"]
    assert body["inputs"][3]["shape"] == [2, "batch", 2, "past", 16]  # (S, B, H, P, D), dynamic B and P
    assert [i["shape"][0] for i in manifest["graphs"]["model"]["inputs"][2:]] == ["loops", "loops"]
    assert {"config.json", "eval.json", "tokenizer.tiktoken", "tokenizer.json"} <= set(manifest["files"])
    assert any(line.startswith("[4/4] model.onnx") for line in lines) and "parity" in lines[-2]
    for g in manifest["graphs"].values():
        proto = onnx.load(str(out / g["file"]))
        assert not any(n.metadata_props for n in proto.graph.node), "debug metadata left in the graph"
        assert g["sha256"] == sha256(out / g["file"])
    ops = {n.op_type for n in onnx.load(str(out / "loop_body.onnx")).graph.node}
    assert "Attention" in ops


@pytest.mark.parametrize("loops", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_split_runner_matches_torch_prefill_and_decode(model, runner, loops, batch):
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(loops * 10 + batch))
    ref_cache, ort_cache = KVCache(cfg, batch, 16, loops), KVCache(cfg, batch, 16, loops)
    with torch.inference_mode():
        for step in (idx[:, :7], idx[:, 7:]):  # prefill with an empty past, then a 1-token decode with it
            ref, _ = model(step, loops, kv_cache=ref_cache)
            got, none = runner(step, loops, kv_cache=ort_cache)
            assert none is None and got.shape == ref.shape and got.dtype == torch.float32
            assert float((ref - got).abs().max()) <= TOL
    assert ort_cache.lengths.tolist() == [8] * batch
    assert torch.allclose(ref_cache.k, ort_cache.k, atol=TOL) and torch.allclose(ref_cache.v, ort_cache.v, atol=TOL)


@pytest.mark.parametrize("loops", [1, 2, 4, 7])  # 7: beyond the trained 4, the last gate is reused as in PyTorch
@pytest.mark.parametrize("batch", [1, 3])
def test_single_file_matches_torch_prefill_and_decode(exported, model, loops, batch):
    cfg = model.config
    session = ort.InferenceSession(str(exported[0] / "model.onnx"), providers=["CPUExecutionProvider"])
    idx = torch.randint(0, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(loops))
    with torch.inference_mode():
        ref, _ = model(idx, loops)
    past_k = past_v = np.zeros((loops, 2, batch, cfg.n_head, 0, cfg.head_dim), np.float32)
    pos = np.broadcast_to(np.arange(8), (batch, 8))
    for sl in (slice(0, 7), slice(7, 8)):
        feed = {"idx": idx[:, sl].numpy(), "pos": np.ascontiguousarray(pos[:, sl]), "past_k": past_k, "past_v": past_v}
        logits, k, v = session.run(None, feed)
        assert k.shape == (loops, 2, batch, cfg.n_head, sl.stop - sl.start, cfg.head_dim)
        assert float(np.abs(ref[:, sl].numpy() - logits).max()) <= TOL
        past_k, past_v = np.concatenate([past_k, k], axis=4), np.concatenate([past_v, v], axis=4)


def test_per_row_loops_rows_and_ragged_lengths_like_serving(model, runner):
    """A serving batch: cache rows out of order, each prefilled to its own length, per-row loops in one call."""
    cfg = model.config
    gen = torch.Generator().manual_seed(3)
    caches = [KVCache(cfg, 4, 32, 4), KVCache(cfg, 4, 32, 4)]
    rows, loops = torch.tensor([2, 0, 3]), torch.tensor([4, 1, 3])
    with torch.inference_mode():
        for r, n, length in zip(rows.tolist(), loops.tolist(), (3, 9, 5), strict=True):
            prompt = torch.randint(0, cfg.vocab_size, (1, length), generator=gen)
            for cache, fn in zip(caches, (model, runner), strict=True):
                fn(prompt, n, kv_cache=cache, rows=torch.tensor([r]))
        for _ in range(3):
            token = torch.randint(0, cfg.vocab_size, (3, 1), generator=gen)
            ref, _ = model(token, loops, kv_cache=caches[0], rows=rows)
            got, _ = runner(token, loops, kv_cache=caches[1], rows=rows)
            assert float((ref - got).abs().max()) <= TOL
    assert caches[1].lengths.tolist() == caches[0].lengths.tolist() == [12, 0, 6, 8]


def test_generate_tokens_greedy_identical(model, runner):
    greedy = SamplingParams(temperature=0.0)
    for loops in (1, 3, 4):
        prompt = [5, 17, 42, 99]
        ref = list(generate_tokens(model, prompt, loops, 20, greedy))
        assert list(generate_tokens(runner, prompt, loops, 20, greedy)) == ref


def test_runner_rejects_bad_requests(runner):
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="loops must be in 1..16"):
        runner(idx, 17)
    with pytest.raises(ValueError, match="per-row loops must have shape"):
        runner(idx, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="computes no loss"):
        runner(idx, 1, targets=idx)
    with pytest.raises(ValueError, match="beyond the context"):
        runner(torch.zeros(1, 65, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="KV cache holds 2 loops"):
        runner(idx, 3, kv_cache=KVCache(runner.config, 2, 8, loops=2))


def test_verify_catches_a_wrong_export(exported):
    other = tiny_model(seed=1, vocab_size=exported[1]["config"]["vocab_size"])
    with pytest.raises(ExportError, match="differs from PyTorch"):
        verify_export(other, exported[0], log=lambda _: None)


def test_load_onnx_errors(tmp_path, exported):
    with pytest.raises(ExportError, match="does not exist"):
        load_onnx(tmp_path / "nope")
    with pytest.raises(ExportError, match="manifest is missing"):
        load_onnx(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ExportError, match="not a loopgpt-onnx/1 manifest"):
        load_onnx(tmp_path)
    with pytest.raises(ExportError, match="not available"):
        load_onnx(exported[0], providers=["NoSuchExecutionProvider"])


def test_cli_generate_onnx_equals_torch(exported, tiny_checkpoint, capsys):
    args = ["generate", "--prompt", "Once upon a time", "--loops", "3", "--max-tokens", "12", "--seed", "1"]
    assert main([*args, "--checkpoint", str(tiny_checkpoint)]) == 0
    torch_out = capsys.readouterr().out
    assert main([*args, "--checkpoint", str(exported[0]), "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == torch_out


def test_cli_errors_are_one_sentence(tmp_path, tiny_checkpoint, capsys):
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loopgpt export: error:") and "does not exist" in err and err.count("\n") == 1
    assert main(["export", "onnx", "--checkpoint", str(tiny_checkpoint), "--out", str(tiny_checkpoint)]) == 2
    assert "is the checkpoint directory itself" in capsys.readouterr().err
    assert main(["generate", "--backend", "onnx", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest is missing" in capsys.readouterr().err


def test_decode_benchmark_function(model, runner):
    for m in (model, runner):
        assert decode_tokens_per_s(m, 2, prompt_len=4, tokens=4, repeats=1) > 0


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="checkpoints/demo does not exist yet")
def test_demo_greedy_text_identical(tmp_path):
    out = tmp_path / "demo-onnx"
    export_onnx(DEMO, out, verify=True, log=lambda _: None)
    model, tokenizer, _ = load_checkpoint(DEMO)
    runner = load_onnx(out)[0]
    greedy = SamplingParams(temperature=0.0)
    prompts = ["Once upon a time", "The little dog", "She said", "One day, Tom and his mom"]
    for loops in (1, 3, model.config.max_loops):
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            ref = list(generate_tokens(model, ids, loops, 32, greedy))
            got = list(generate_tokens(runner, ids, loops, 32, greedy))
            assert tokenizer.decode(got) == tokenizer.decode(ref), (loops, prompt)

"""Export a checkpoint to ONNX: split graphs (embed, loop body, head) and one single-file model, plus a manifest.

The export directory is self-contained: the graphs, `manifest.json`, and the checkpoint's config.json,
eval.json and tokenizer files, so `loopgpt.export.load_onnx(DIR)` needs nothing else.

    loopgpt export onnx --checkpoint checkpoints/demo --out exports/demo
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from loopgpt.model import LoopGPT, load_checkpoint
from loopgpt.model.checkpoint import CONFIG, EVAL, WEIGHTS
from loopgpt.model.tokenizer import BPE_FILE, BPE_META

from .graphs import Embed, FullModel, Head, LoopBody
from .manifest import FORMAT, MANIFEST, SINGLE, ExportError

OPSET = 23  # opset 23 has ONNX Attention; opset 20 measured 10-25% slower here


class NoTorchvision(logging.Filter):
    """The exporter warns, four lines per graph, that torchvision's detection ops cannot be registered without
    torchvision; our graphs use none of them, so those lines are noise (other warnings still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(NoTorchvision())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _examples(model: LoopGPT) -> dict[str, torch.Tensor]:
    """Example inputs whose dynamic sizes are all >= 2, so export never specialises a size of 0 or 1.

    Keys and values get distinct tensors: export traces one tensor passed twice as one input.
    """
    cfg = model.config
    B, T, P, N = 2, 3, 4, 2
    S = cfg.n_layer * cfg.inner_loops
    past = torch.zeros(S, B, cfg.n_head, P, cfg.head_dim, dtype=model.lm_head.weight.dtype)
    pos = (P + torch.arange(T))[None].expand(B, T).contiguous()
    past_n = past[None].expand(N, *past.shape)
    return dict(idx=torch.zeros(B, T, dtype=torch.long), pos=pos, x=torch.zeros(B, T, cfg.n_embd),
                past_k=past.clone(), past_v=past.clone(), past_n_k=past_n.clone(), past_n_v=past_n.clone())


def _specs(model: LoopGPT) -> list[tuple[str, torch.nn.Module, tuple, list[str], list[str], dict]]:
    """(file, module, example args, input names, output names, dynamic_shapes keyed by forward arg names)."""
    from torch.export import Dim

    e = _examples(model)
    batch, seq, past, loops = Dim("batch"), Dim("seq"), Dim("past"), Dim("loops")
    bt = {0: batch, 1: seq}
    kv = {1: batch, 3: past}
    return [
        ("embed.onnx", Embed(model), (e["idx"], e["pos"]), ["idx", "pos"], ["x"], {"idx": bt, "pos": bt}),
        ("loop_body.onnx", LoopBody(model), (e["x"], e["pos"], torch.tensor(1), e["past_k"], e["past_v"]),
         ["x", "pos", "loop", "past_k", "past_v"], ["x_out", "present_k", "present_v"],
         {"x": bt, "pos": bt, "loop": None, "past_k": kv, "past_v": kv}),
        ("head.onnx", Head(model), (e["x"],), ["x"], ["logits"], {"x": bt}),
        (SINGLE, FullModel(model), (e["idx"], e["pos"], e["past_n_k"], e["past_n_v"]),
         ["idx", "pos", "past_k", "past_v"], ["logits", "present_k", "present_v"],
         {"idx": bt, "pos": bt, "past_k": {0: loops, 2: batch, 4: past}, "past_v": {0: loops, 2: batch, 4: past}}),
    ]


def _strip_metadata(graph) -> None:
    """Drop per-node debug metadata (0.5-1 MB per small graph), subgraphs (Scan bodies) included."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_metadata(attr.g)
            for g in attr.graphs:
                _strip_metadata(g)


def _io(values) -> list[dict]:
    from onnx import TensorProto

    return [
        {"name": v.name, "dtype": TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower(),
         "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
        for v in values
    ]


def export_graph(module: torch.nn.Module, args: tuple, path: Path, inputs, outputs, dynamic) -> dict:
    """One graph to one file (no external data), checked; returns its manifest entry."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's axis-renaming and deprecation chatter
        program = torch.onnx.export(
            module.eval(), args, None, opset_version=OPSET, dynamo=True, verbose=False,
            input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
        )
    proto = program.model_proto
    _strip_metadata(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"file": path.name, "inputs": _io(proto.graph.input), "outputs": _io(proto.graph.output),
            "sha256": sha256(path), "bytes": path.stat().st_size}


def _copy_checkpoint_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in (CONFIG, EVAL, BPE_FILE, BPE_META):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def export_onnx(checkpoint: str | Path, out: str | Path, verify: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Write every graph, the manifest and the checkpoint's side files to `out`; returns the manifest."""
    src, out = Path(checkpoint), Path(out)
    model, tokenizer, _ = load_checkpoint(src)
    model.requires_grad_(False)  # scan's export traces autograd otherwise, and fails on the weights
    cfg = model.config
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory; choose another --out")
    if out.resolve() == src.resolve():
        raise ExportError(f"{out}: is the checkpoint directory itself; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    graphs = {}
    specs = _specs(model)
    if cfg.kv_budget:
        # model.onnx gives every loop its own past; a capped KV budget shares slots across loops.
        log(f"kv_budget {cfg.kv_budget}: skipping {SINGLE} (it needs one K/V slot per loop); the split form works")
        specs = [s for s in specs if s[0] != SINGLE]
    for i, (name, module, args, inputs, outputs, dynamic) in enumerate(specs, 1):
        log(f"[{i}/{len(specs)}] exporting {name} ...")
        t0 = time.perf_counter()
        graphs[name.removesuffix(".onnx")] = entry = export_graph(module, args, out / name, inputs, outputs, dynamic)
        log(f"[{i}/{len(specs)}] {name}: {entry['bytes'] / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
    manifest = {
        "format": FORMAT,
        "opset": OPSET,
        "torch": torch.__version__,
        "source": {"checkpoint": str(src), "model_sha256": sha256(src / WEIGHTS)},
        "config": cfg.to_dict(),
        "loops": {"min": 1, "trained": cfg.max_loops, "cap": cfg.loop_cap, "inner": cfg.inner_loops,
                  "rule": "loops beyond the trained maximum reuse the last trained gate"},
        "kv": {"slots_per_loop": cfg.n_layer * cfg.inner_loops, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
               "split_layout": "(slots_per_loop, batch, n_head, past, head_dim)",
               "single_layout": "(loops, slots_per_loop, batch, n_head, past, head_dim)",
               "mask": "a past key j is visible to a row when j < pos[row, 0]; new keys are causal by pos"},
        "tokenizer": {"name": cfg.tokenizer, "eot_token": cfg.eot_token, "n_vocab": tokenizer.n_vocab},
        "files": _copy_checkpoint_files(src, out),
        "graphs": graphs,
    }
    if verify:
        from .parity import verify_export

        log("verifying onnxruntime against PyTorch ...")
        manifest["verify"] = verify_export(model, out, log=log)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out} ({sum(g['bytes'] for g in graphs.values()) / 1e6:.2f} MB of graphs)")
    return manifest

"""The CUDA path: a sync-free decode step, CUDA graphs and torch.compile equal to eager, bf16 vs float32.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest -m gpu -q`.

    python -m pytest tests/test_gpu.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loopgpt.model import SamplingParams, generate_tokens, load_checkpoint
from loopgpt.server.engine import ModelRunner, PrefillChunk, Sample, StepPlan
from loopgpt.server.inprocess import InProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)


def demo(dtype: torch.dtype):
    return load_checkpoint(DEMO, device="cuda", dtype=dtype)[:2]


def mixed_specs(tokenizer, max_loops: int) -> list[tuple[list[int], int, int]]:
    prompts = ["Once upon a time", "She loved to play", "The little dog", "Lily ran and kicked the ball", "Mom said"]
    return [(tokenizer.encode(prompts[n % len(prompts)]), n, 24) for n in range(1, max_loops + 1)] + [
        (tokenizer.encode("One day"), 1, 40)]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_decode_step_never_waits_for_the_device(cuda_graphs):
    """Inside a step (inputs up, one loop for a mixed batch, head + sampling, outputs down) nothing syncs, with
    logprobs (the head's top columns) and min_tokens (a banned token) asked by some rows."""
    model, tokenizer = demo(torch.bfloat16)
    runner = ModelRunner(model, 8, device="cuda", dtype=torch.bfloat16, cuda_graphs=cuda_graphs)
    with runner.context():
        runner.warmup(max_ctx=64)
        prompts = [tokenizer.encode(p) for p in ("Once upon a time", "The dog", "She said")]
        plan = StepPlan(prefill=[PrefillChunk(r, p, 0, 6) for r, p in enumerate(prompts)],
                        samples=[Sample(r, r, r, SAMPLED, r, 0) for r in range(3)])  # one lane per row
        runner.run(plan).result()
        runner.ban(1, [tokenizer.eot_token])
        pos = [len(p) for p in prompts]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending = []
            depth = (1, 2, 6)  # the three rows' loops
            for step in range(12):
                loops = [step % n for n in depth]
                last = [r for r in range(3) if loops[r] == depth[r] - 1]
                samples = [Sample(r, r, r, SAMPLED if r else GREEDY, r, step, ban=r == 1, top=r != 1) for r in last]
                plan = StepPlan(lanes=[0, 1, 2], rows=[0, 1, 2], pos=pos, loop=loops, samples=samples)
                pending.append(runner.run(plan))
                pos = [p + (r in last) for r, p in enumerate(pos)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(len(p.result()) > 0 for p in pending if p is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_and_the_reference(dtype):
    """Greedy tokens of a mixed batch (loops 1..max): graphs == eager engine (bit for bit: the same kernels);
    in float32 both also equal the reference decode loop (`generate_tokens`)."""
    model, tokenizer = demo(dtype)
    specs = mixed_specs(tokenizer, model.config.max_loops)
    out = {}
    for graphs in (False, True):
        engine = InProcess(model, tokenizer, 8, device="cuda", dtype=dtype, cuda_graphs=graphs)
        try:
            out[graphs] = engine.generate(specs)[0]
        finally:
            engine.close()
    assert out[True] == out[False]
    if dtype == torch.float32:
        with torch.inference_mode():
            ref = [list(generate_tokens(model, p, n, m, GREEDY)) for p, n, m in specs]
        assert out[False] == ref


def test_compile_equals_eager():
    """torch.compile of the step (with CUDA graphs on top) gives eager's greedy tokens, float32."""
    model, tokenizer = demo(torch.float32)
    specs = mixed_specs(tokenizer, model.config.max_loops)
    out = []
    for compile in (False, True):
        engine = InProcess(model, tokenizer, 8, device="cuda", dtype=torch.float32, compile=compile,
                           cuda_graphs=compile)
        try:
            out.append(engine.generate(specs)[0])
        finally:
            engine.close()
    assert out[1] == out[0]


def test_bfloat16_agrees_with_float32_on_the_demo():
    """bf16 weights, activations and KV cache; logits and sampling in float32. Reported: greedy agreement and
    max logit error against float32, teacher-forced on the float32 greedy text (so one early flip does not
    count twice)."""
    (m32, tok), (m16, _) = demo(torch.float32), demo(torch.bfloat16)
    agree, total, err = 0, 0, 0.0
    with torch.inference_mode():
        for n in range(1, m32.config.max_loops + 1):
            prompt = tok.encode("Once upon a time, there was a little girl named Lily.")
            text = list(generate_tokens(m32, prompt, n, 48, GREEDY))
            idx = torch.tensor([prompt + text[:-1]], device="cuda")
            a, b = m32(idx, n)[0][0, len(prompt) - 1:], m16(idx, n)[0][0, len(prompt) - 1:].float()
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0]
            err = max(err, float((a - b).abs().max()))
    print(f"bf16 vs fp32 on the demo, loops 1..{m32.config.max_loops}: greedy agreement {agree}/{total} "
          f"({agree / total:.1%}), max |logit error| {err:.3f}")
    assert agree / total > 0.9

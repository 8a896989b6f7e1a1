"""The serving engine without HTTP: depth-wise batching equals solo runs, rows are reused, queue bounds.

    python -m pytest tests/test_server_engine.py -q
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model
from loopgpt.model import KVCache, SamplingParams, generate_tokens, load_checkpoint
from loopgpt.server.engine import Engine, FinishEvent, NotAccepting, QueueFull, Request, TokenEvent
from loopgpt.server.runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0)


class Collector:
    """A thread-safe emit callback that remembers one request's events."""

    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if isinstance(ev, FinishEvent):
            self.done.set()

    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    def finish(self) -> FinishEvent:
        assert self.done.wait(60), "request did not finish within 60 s"
        return self.events[-1]


@torch.inference_mode()
def test_batched_logits_match_solo_for_16_steps():
    """A greedy row decoded beside rows of other depths and lengths gets the solo run's logits (1e-4)."""
    model = tiny_model(block_size=128)
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8], [11, 4, 6, 2, 9, 9, 1, 0], [7]]
    loops = [3, 1, 16, 6]
    runner = ModelRunner(model, max_batch=6)
    rows = [4, 0, 2, 5]  # scattered rows: the cache's gather path, not the whole-cache view
    last = [runner.prefill(r, p, n, prompt_nll=False)[0] for r, p, n in zip(rows, prompts, loops, strict=True)]
    solo = KVCache(model.config, 1)
    solo_logits, _ = model(torch.tensor([prompts[0]]), loops[0], kv_cache=solo)
    solo_last = solo_logits[0, -1]
    for step in range(16):
        torch.testing.assert_close(last[0], solo_last, atol=1e-4, rtol=0, msg=f"step {step}")
        tokens = [int(torch.argmax(x)) for x in last]
        batch = runner.decode(rows, tokens, loops)
        last = list(batch)
        solo_last = model(torch.tensor([[tokens[0]]]), loops[0], kv_cache=solo)[0][0, -1]


@pytest.fixture(scope="module")
def engine_parts(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return model, tokenizer


def test_mixed_loops_requests_equal_their_solo_greedy_output(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(ModelRunner(model, max_batch=3), tokenizer, max_queue=8)
    engine.start()
    try:
        specs = [("Once upon a time", 1, 20), ("She loved to play", 4, 12), ("The end.", 16, 16),
                 ("Lily ran and kicked", 2, 9), ("Her mom smiled", 7, 14)]  # 5 requests, 3 rows
        collectors = []
        for prompt, loops, n in specs:
            c = Collector()
            engine.submit(Request(tokenizer.encode(prompt), loops, n, GREEDY, emit=c, eos_token=-1))
            collectors.append(c)
        for (prompt, loops, n), c in zip(specs, collectors, strict=True):
            ev = c.finish()
            oracle = list(generate_tokens(model, tokenizer.encode(prompt), loops, n, GREEDY))
            assert c.tokens() == oracle, f"loops={loops}"
            assert ev.finish_reason == "length" and ev.completion_tokens == n
            assert ev.prompt_nll is not None and ev.token_nll is not None
        total = sum(n for _, _, n in specs)
        # Rows decoded together: far fewer forwards than tokens (each request's first token is its prefill).
        assert engine.steps < total - len(specs)
        assert engine.counts() == (0, 0) and sorted(engine.free_rows) == [0, 1, 2]
    finally:
        engine.stop()


class CallLog(ModelRunner):
    """A real runner that records which forwards the engine asked for, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def prefill_chunk(self, row, chunk, start, loops, next_token, prompt_nll):
        self.calls.append(("prefill", row, start, len(chunk)))
        return super().prefill_chunk(row, chunk, start, loops, next_token, prompt_nll)

    def decode(self, rows, tokens, loops):
        self.calls.append(("decode", tuple(rows)))
        return super().decode(rows, tokens, loops)


def test_chunked_prefill_interleaves_with_decoding_and_changes_nothing(engine_parts):
    """A long prompt enters the cache `prefill_chunk` tokens per engine turn while a running row keeps getting a
    token each turn; its tokens and prompt NLL equal the whole-prompt prefill."""
    model, tokenizer = engine_parts
    runner = CallLog(model, max_batch=2)
    engine = Engine(runner, tokenizer, prefill_chunk=8)
    long_ids = tokenizer.encode("Once upon a time, there was a little girl named Lily. She liked to play in the "
                                "park with her big red ball and her small brown dog, every day after school.")
    assert len(long_ids) > 3 * 8
    short, long = Collector(), Collector()
    long_req = Request(long_ids, 5, 6, GREEDY, emit=long, eos_token=-1)
    engine.start()
    try:
        with engine.cond:  # both admitted in the same turn: the short one (first) is prefilled and decoding
            engine.submit(Request(tokenizer.encode("Hi"), 3, 40, GREEDY, emit=short, eos_token=-1))
            engine.submit(long_req)
        ev = long.finish()
        short.finish()
    finally:
        engine.stop()
    assert long.tokens() == list(generate_tokens(model, long_ids, 5, 6, GREEDY))
    assert short.tokens() == list(generate_tokens(model, tokenizer.encode("Hi"), 3, 40, GREEDY))
    with torch.inference_mode():
        whole_nll = ModelRunner(model, max_batch=1).prefill(0, long_ids, 5, prompt_nll=True)[1]
    assert ev.prompt_nll == pytest.approx(whole_nll, rel=1e-5)
    chunks = [i for i, c in enumerate(runner.calls) if c[0] == "prefill" and c[1] == long_req.row]
    spans = [runner.calls[i][2:] for i in chunks]  # (start, length); the short prompt shares the first turn's 8
    assert spans[0][0] == 0 and all(n <= 8 for _, n in spans) and len(spans) >= 4
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][0] + spans[-1][1] == len(long_ids)
    for i in chunks[:-1]:  # after every chunk but the last, the short request's row took its decode step
        assert runner.calls[i + 1][0] == "decode" and long_req.row not in runner.calls[i + 1][1]


def test_stop_string_and_abort(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(ModelRunner(model, max_batch=2), tokenizer)
    engine.start()
    try:
        ids = tokenizer.encode("Once upon a time")
        full = Collector()
        engine.submit(Request(ids, 2, 30, GREEDY, emit=full, eos_token=-1))
        tail = full.finish().text
        text = "".join(e.text for e in full.events[:-1]) + tail
        stop = text[4:7]
        assert stop, "the greedy text is too short to cut"
        cut = Collector()
        engine.submit(Request(ids, 2, 30, GREEDY, emit=cut, stop=[stop], eos_token=-1))
        ev = cut.finish()
        got = "".join(e.text for e in cut.events[:-1]) + ev.text
        assert ev.finish_reason == "stop" and got == text[: text.find(stop)]

        gone = Collector()
        req = Request(ids, 16, 40, GREEDY, emit=gone, eos_token=-1)
        engine.abort(req)  # aborted before it is admitted: never runs
        engine.submit(req)
        assert gone.finish().finish_reason == "abort" and gone.tokens() == []
        assert engine.counts() == (0, 0)
    finally:
        engine.stop()


def test_queue_bound_and_not_accepting(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(ModelRunner(model, max_batch=1), tokenizer, max_queue=2)
    ids = tokenizer.encode("Once")
    with pytest.raises(NotAccepting):
        engine.submit(Request(ids, 1, 2, GREEDY, emit=Collector()))
    engine.start()
    try:
        collectors = [Collector() for _ in range(2)]
        # Holding the engine's (re-entrant) lock keeps its thread from admitting anything meanwhile.
        with engine.cond:
            for c in collectors:
                engine.submit(Request(ids, 1, 2, GREEDY, emit=c))
            with pytest.raises(QueueFull, match="queue is full"):
                engine.submit(Request(ids, 1, 2, GREEDY, emit=Collector()))
        assert all(c.finish().finish_reason in ("length", "stop") for c in collectors)
        engine.drain(0.0)
        with pytest.raises(NotAccepting):
            engine.submit(Request(ids, 1, 2, GREEDY, emit=Collector()))
    finally:
        engine.stop()


@pytest.mark.slow  # the ONNX export itself takes ~20 s on a shared CPU
def test_onnx_runner_plugs_into_the_engine(tiny_checkpoint, tmp_path, engine_parts):
    """`--backend onnx`: the export helper's runner, same call signature, same greedy tokens per loops."""
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("loopgpt.export.onnx_export")
    from loopgpt.server.runner import load_backend

    export.export_onnx(tiny_checkpoint, tmp_path / "onnx", verify=False)
    from loopgpt.export.runtime import load_onnx

    loaded = load_backend(tmp_path / "onnx", "onnx", onnx_loader=load_onnx)
    model, tokenizer = engine_parts
    # prefill_chunk=3: prompts enter the ONNX runner's cache in chunks that attend to a past, too
    engine = Engine(ModelRunner(loaded.model, max_batch=3, device=loaded.device), loaded.tokenizer, prefill_chunk=3)
    engine.start()
    try:
        specs = [("Once upon a time", 1), ("She loved", 7), ("The end", 16)]
        collectors = [Collector() for _ in specs]
        for (prompt, loops), c in zip(specs, collectors, strict=True):
            engine.submit(Request(tokenizer.encode(prompt), loops, 12, GREEDY, emit=c, eos_token=-1))
        for (prompt, loops), c in zip(specs, collectors, strict=True):
            assert c.finish().finish_reason == "length"
            assert c.tokens() == list(generate_tokens(model, tokenizer.encode(prompt), loops, 12, GREEDY))
    finally:
        engine.stop()

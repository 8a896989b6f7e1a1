"""The serving engine without HTTP: depth-wise batching equals solo runs, rows are reused, queue bounds.

    python -m pytest tests/test_server_engine.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loopgpt.model import SamplingParams, generate_tokens, load_checkpoint
from loopgpt.server.engine import Engine, ModelRunner, NotAccepting, QueueFull, Request
from loopgpt.server.inprocess import InProcess
from server_harness import Collector

GREEDY = SamplingParams(temperature=0.0)


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
        # One loop per step for every row: alone, the requests would need sum((tokens - 1) * loops) steps (the
        # first token comes from the prefill); sharing steps, the batch needs far fewer.
        alone = sum((n - 1) * loops for _, loops, n in specs)
        assert engine.steps < 0.75 * alone, (engine.steps, alone)
        assert engine.counts() == (0, 0) and sorted(engine.free_rows) == [0, 1, 2]
    finally:
        engine.stop()


class CallLog(ModelRunner):
    """A real runner that records the plans the engine asked it to run, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plans: list = []

    def run(self, plan):
        self.plans.append(plan)
        return super().run(plan)


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
        logits, _ = model(torch.tensor([long_ids]), 5)
        whole_nll = float(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(long_ids[1:])))
    assert ev.prompt_nll == pytest.approx(whole_nll, rel=1e-5)
    long_row = next(c.row for p in runner.plans for c in p.prefill if c.start == 0 and c.ids == long_ids[:len(c.ids)])
    turns = [(i, c) for i, p in enumerate(runner.plans) for c in p.prefill if c.row == long_row]
    spans = [(c.start, len(c.ids)) for _, c in turns]  # the short prompt shares the first turn's 8 tokens
    assert spans[0][0] == 0 and all(n <= 8 for _, n in spans) and len(spans) >= 4
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    assert spans[-1][0] + spans[-1][1] == len(long_ids)
    # The first turn prefilled both prompts in one forward; from then on every turn that prefilled a chunk of the
    # long prompt also ran a decode step for the short request.
    assert {c.row for c in runner.plans[turns[0][0]].prefill} == {0, 1}
    for i, c in turns[1:]:
        assert runner.plans[i].rows and c.row not in runner.plans[i].rows


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
    from loopgpt.server.engine import load_backend

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


class Poisoning(ModelRunner):
    """A real runner with faults injected: the hidden state of one cache row turns NaN at a given turn (a row's own
    numerical failure), or one whole turn raises (a failing forward)."""

    def __init__(self, *args, poison_turn: int = -1, fail_turn: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.victim_row: int | None = None
        self.poison_turn, self.fail_turn = poison_turn, fail_turn

    def run(self, plan):
        if self.turn == self.fail_turn:
            self.turn += 1
            raise RuntimeError("injected: the batch forward failed")
        if self.turn == self.poison_turn and self.victim_row is not None:
            self.state.hidden[self.victim_row] = float("nan")
        return super().run(plan)


def test_a_failing_row_ends_alone_and_its_batch_mates_finish_unchanged(engine_parts):
    model, tokenizer = engine_parts
    runner = Poisoning(model, max_batch=5, poison_turn=12)
    engine = Engine(runner, tokenizer)
    specs = [("Once upon a time", 1, 20), ("She loved to play", 3, 10), ("The end.", 4, 8), ("Lily ran", 2, 12)]
    victim = Collector()
    engine.start()
    try:
        with engine.cond:  # all admitted together, lowest free row first: the victim (last) gets row 4
            collectors = []
            for prompt, loops, n in specs:
                collectors.append(Collector())
                engine.submit(Request(tokenizer.encode(prompt), loops, n, GREEDY, emit=collectors[-1], eos_token=-1))
            engine.submit(Request(tokenizer.encode("Her mom smiled"), 2, 30, GREEDY, emit=victim, eos_token=-1))
            runner.victim_row = 4
        ev = victim.finish()
        assert ev.finish_reason == "error" and "non-finite logits" in ev.error and ev.completion_tokens < 30
        for (prompt, loops, n), c in zip(specs, collectors, strict=True):
            assert c.finish().finish_reason == "length"
            assert c.tokens() == list(generate_tokens(model, tokenizer.encode(prompt), loops, n, GREEDY))
    finally:
        engine.stop()


def test_a_failing_forward_aborts_its_batch_and_the_engine_goes_on(engine_parts):
    model, tokenizer = engine_parts
    engine = Engine(Poisoning(model, max_batch=2, fail_turn=5), tokenizer)
    engine.start()
    try:
        ids = tokenizer.encode("Once upon a time")
        first = Collector()
        engine.submit(Request(ids, 3, 20, GREEDY, emit=first, eos_token=-1))
        assert first.finish().finish_reason == "abort"
        after = Collector()
        engine.submit(Request(ids, 3, 6, GREEDY, emit=after, eos_token=-1))
        assert after.finish().finish_reason == "length"
        assert after.tokens() == list(generate_tokens(model, ids, 3, 6, GREEDY))
    finally:
        engine.stop()


DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"


@pytest.mark.slow  # compiling the step takes a while on two cores
def test_compiled_step_gives_eager_greedy_tokens_on_the_demo():
    """--compile (torch.compile of the decode step and the head) on the CPU: the demo's greedy tokens at loops
    1..max, all in one mixed batch, equal eager's."""
    model, tokenizer, _ = load_checkpoint(DEMO)
    prompts = ["Once upon a time", "She loved to play", "The little dog", "Lily ran", "Mom said", "One day"]
    specs = [(tokenizer.encode(prompts[n - 1]), n, 16) for n in range(1, model.config.max_loops + 1)]
    out = []
    for compile in (False, True):
        engine = InProcess(model, tokenizer, 8, compile=compile)
        try:
            out.append(engine.generate(specs)[0])
        finally:
            engine.close()
    assert out[1] == out[0]
    assert all(len(tokens) == 16 for tokens in out[1])

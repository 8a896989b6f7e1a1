"""The engine in its own process (server/engine/process.py): the same greedy tokens as `generate_tokens`, batched
across depths; one message per step carries the metrics over; a dead engine process ends its requests with an
error, refuses new ones and reports itself dead; a load failure comes back as the engine's own sentence.

    python -m pytest tests/test_engine_process.py -q
"""

from __future__ import annotations

import threading

import pytest
from loopgpt.model import SamplingParams, generate_tokens, load_checkpoint
from loopgpt.server.engine import FinishEvent, NotAccepting, QueueFull, Request, TokenEvent
from loopgpt.server.engine.process import spawn_engine
from loopgpt.server.engine.request import Adaptive
from loopgpt.server.engine.speculation import SpecRequest
from loopgpt.server.engine.wire import decode, encode, pack_event, pack_request, unpack_event, unpack_request
from loopgpt.server.metrics import ServerMetrics
from loopgpt.server.options import ServerOptions

GREEDY = SamplingParams(temperature=0.0)


class Collector:
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


def test_a_request_and_its_events_cross_the_wire_unchanged():
    sibling = Request([5], 2, 3, GREEDY, emit=print, seed=8, rid=4)
    req = Request([1, 2, 3], None, 9, SamplingParams(0.7, 5, 0.9), emit=print, seed=7, stop=["x"],
                  speculative=SpecRequest(2, 3), adaptive=Adaptive(0.01, 3, 6), logprobs=2, priority=-1, rid=3,
                  siblings=[sibling], stop_token_ids=[9], arrival=12.5)
    sinks: list[int] = []
    back = unpack_request(decode(encode(pack_request(req))), lambda rid: sinks.append(rid) or print)
    assert back.siblings[0].prompt_ids == [5] and back.siblings[0].rid == 4 and sinks == [3, 4]
    back.siblings, req.siblings = [], []
    assert back == req  # every field, the nested dataclasses included (emit is `print` on both)
    token = TokenEvent(0, 5, "a", 1.5, 2.0, [(5, -0.1), (6, -2.0)])
    again = unpack_event(decode(encode(pack_event(token))))
    assert isinstance(again, TokenEvent) and again.top == [[5, -0.1], [6, -2.0]]  # pairs come back as lists
    again.top = token.top
    assert again == token
    finish = FinishEvent("stop", "", 3, 1, 0.1, 0.2, 1.0, 2.0, None, 6.0)
    assert unpack_event(decode(encode(pack_event(finish)))) == finish


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    opt = ServerOptions(checkpoint=str(tiny_checkpoint), max_batch=3, max_queue=6, dtype="float32",
                        prompt_nll=1.0, spec_tokens=0)
    loaded = spawn_engine(opt, threads=1)
    client = loaded.engine
    client.metrics = ServerMetrics(loaded.model.config.loop_cap, trained=loaded.model.config.max_loops)
    client.start()
    yield loaded, client
    if client.alive():
        client.stop()


def test_process_engine_matches_generate_tokens_at_every_depth_batched(engine, tiny_checkpoint):
    loaded, client = engine
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    specs = [("Once upon a time", 1, 12), ("She loved to play", 4, 8), ("The end.", 6, 10), ("Lily ran", 2, 9)]
    collectors = []
    for prompt, loops, n in specs:  # 4 requests on 3 rows: one waits for a row
        c = Collector()
        client.submit_all([Request(tokenizer.encode(prompt), loops, n, GREEDY, emit=c, eos_token=-1)])
        collectors.append(c)
    for (prompt, loops, n), c in zip(specs, collectors, strict=True):
        ev = c.finish()
        assert c.tokens() == list(generate_tokens(model, tokenizer.encode(prompt), loops, n, GREEDY)), loops
        assert ev.finish_reason == "length" and ev.completion_tokens == n and ev.prompt_nll is not None
    text = client.metrics.exposition().decode()
    assert 'loopgpt_generation_tokens_total{loops="4"} 8.0' in text  # replayed on this side, from the engine's calls
    cpu = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("loopgpt_engine_cpu_seconds"))
    assert cpu > 0
    assert client.counts() == (0, 0)


def test_the_queue_limit_is_kept_on_the_api_side(engine):
    _, client = engine
    reqs = [Request([1, 2], 1, 1, GREEDY, emit=Collector()) for _ in range(7)]
    with pytest.raises(QueueFull):
        client.submit_all(reqs)  # 7 > --max-queue 6: none is sent
    assert client.counts() == (0, 0)


def test_a_dead_engine_process_ends_its_requests_and_refuses_new_ones(engine):
    _, client = engine
    c = Collector()
    client.submit_all([Request(list(range(1, 20)), 6, 200, GREEDY, emit=c, eos_token=-1)])
    assert client.alive()
    client.proc.kill()
    ev = c.finish()
    assert ev.finish_reason == "error" and "engine process stopped" in ev.error
    assert not client.alive()
    with pytest.raises(NotAccepting, match="engine process has stopped"):
        client.submit_all([Request([1], 1, 1, GREEDY, emit=Collector())])


def test_a_load_failure_is_the_engines_own_sentence(tmp_path):
    opt = ServerOptions(checkpoint=str(tmp_path), dtype="float32")  # no config.json
    with pytest.raises(ValueError, match="config"):
        spawn_engine(opt, threads=1)

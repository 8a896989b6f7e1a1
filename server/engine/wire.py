"""What crosses the boundary between the API process and the engine process, as msgpack (msgspec).

API -> engine, one message per call:     ["add", [request, ...]]  ["abort", rid]  ["drain", grace_s]  ["stop"]
engine -> API, one message per engine step (vLLM V1's EngineCoreOutputs, in our words):
    ["step", {"events": [[rid, kind, fields], ...],  every token / finish / prompt-scores event of the step
              "calls": [[method, args], ...],         the step's ServerMetrics calls, replayed on the API side
              "running": n, "waiting": n, "received": n,  the engine's queue, and add messages it has read
              "cpu": seconds}]                        the engine process's CPU time so far
plus ["ready", info] or ["error", sentence] once at start, and ["bye"] when it stops.

A Request crosses as its plain fields (`emit`, the siblings and the status flags stay on their side); events and
metric arguments as [kind, fields] lists, rebuilt into the same dataclasses on the other side.

    python -m pytest tests/test_engine_process.py -q
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec
from loopgpt.model import SamplingParams

from ..logprobs import PromptScores
from .request import Adaptive, FinishEvent, Request, TokenEvent
from .speculation import SpecRequest

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode

LOCAL = ("emit", "siblings", "aborted", "done")  # never cross: a callback, the group, and each side's own flags
FIELDS = [f.name for f in dataclasses.fields(Request) if f.name not in LOCAL]
NESTED = {"params": SamplingParams, "speculative": SpecRequest, "adaptive": Adaptive}
EVENTS = {"t": TokenEvent, "f": FinishEvent, "p": PromptScores}
KINDS = {cls: kind for kind, cls in EVENTS.items()}


def pack_request(req: Request) -> list:
    """[fields..., [siblings...]]: a request with the further choices admitted with it."""
    values = [getattr(req, name) for name in FIELDS]
    return [msgspec.to_builtins(values), [pack_request(s) for s in req.siblings]]


def unpack_request(msg: list, emit: Callable[[int], Callable[[Any], None]]) -> Request:
    """The request again, its events going to `emit(rid)`."""
    values, siblings = msg
    fields = dict(zip(FIELDS, values, strict=True))
    for name, cls in NESTED.items():
        if fields[name] is not None:
            fields[name] = msgspec.convert(fields[name], cls)
    return Request(**fields, emit=emit(fields["rid"]), siblings=[unpack_request(s, emit) for s in siblings])


def pack_event(event: Any) -> list:
    return [KINDS[type(event)], [getattr(event, f.name) for f in dataclasses.fields(event)]]


def unpack_event(msg: list) -> Any:
    kind, values = msg
    return EVENTS[kind](*values)


def pack_arg(arg: Any) -> Any:
    """A ServerMetrics call's argument: a Request by its id, an event as itself, anything else as msgpack has it."""
    if isinstance(arg, Request):
        return ["req", arg.rid]
    if type(arg) in KINDS:
        return ["event", pack_event(arg)]
    return ["value", arg]


def unpack_arg(msg: list, requests: dict[int, Request]) -> Any:
    kind, value = msg
    return requests.get(value) if kind == "req" else unpack_event(value) if kind == "event" else value

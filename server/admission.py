"""Admission: what one HTTP request asks of the engine, worked out once from its query, its body and the limits of
the served model, before the first byte of the response.

Every rule about a request's depth and size lives here, once: the `loops` query parameter; the depth (the query's,
the body's, a model named `demo:loops=N`, else the trained depth cut to `max_loops`); loops "auto" and its
companions (the policy and its refusal of a KV budget are model/adaptive.py's `check_adaptive`); the context and the
loops range (model/generate.py's, which `loopgpt generate` applies too); how many rows and queue entries a body may
take; self-speculation. A broken rule is an APIError in OpenAI's shape that names the field (`param`).

A route hands over in one direction, each step feeding the next:

    query_loops(?loops=)        -> the query's loops (first: every later error is counted under it)
    Admission.depth(body, ...)  -> Depth: a fixed `loops`, or an adaptive policy with its budget
    Admission.admit(body, depth, token ids) -> Admitted, which server/choices.py turns into engine Requests

    python -m pytest tests/test_server_http.py -q -k "loops or speculative or adaptive"
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loopgpt.model import SamplingParams
from loopgpt.model.adaptive import check_adaptive
from loopgpt.model.generate import RequestError, check_context, check_loops

from .engine import Adaptive
from .engine.speculation import SpecRequest
from .schemas import APIError


@dataclass(frozen=True)
class Depth:
    """How deep a request's tokens run: a fixed number of loops, or (loops "auto") an adaptive policy whose
    max_loops is the budget."""

    loops: int | None
    adaptive: Adaptive | None = None

    @property
    def label(self) -> int | str:
        """The depth as responses and the metrics' `loops` label give it back: the loops, or "auto"."""
        return "auto" if self.adaptive is not None else self.loops


@dataclass(frozen=True)
class Admitted:
    """An admitted request's work: each prompt (token ids) decoded `candidates` times at `depth`."""

    prompts: list[list[int]]
    candidates: int
    depth: Depth
    max_tokens: int
    params: SamplingParams
    seed: int | None
    stop: list[str]
    speculative: SpecRequest | None
    fields: dict[str, Any]  # the rest of the engine Request, as the body's shape gives it (`engine_fields`)


@contextlib.contextmanager
def as_api_error() -> Iterator[None]:
    """A model limit's RequestError as the 400 a client reads, with the same sentence, param and code."""
    try:
        yield
    except RequestError as e:
        raise APIError(400, str(e), e.param, code=e.code) from e


def query_loops(values: list[str]) -> int | str | None:
    """`?loops=N` or `?loops=auto` (the values of every `loops` key); anything else, or a repeated key, is a 400
    naming `loops`."""
    if not values:
        return None
    if len(values) > 1:
        raise APIError(400, f"loops is given {len(values)} times in the query; give it once", "loops")
    if values[0].strip() == "auto":
        return "auto"
    if not re.fullmatch(r"[+-]?[0-9]{1,18}", values[0].strip()):
        raise APIError(400, f"loops must be an integer or auto, got {values[0][:40]!r}", "loops")
    return int(values[0])


class Admission:
    """The served model's limits (its serving config, the server's options, the names it answers to, the first
    one reported) and the rules a request is admitted by."""

    def __init__(self, config: Any, options: Any, names: list[str]):
        self.config, self.options, self.names = config, options, list(names)

    @property
    def name(self) -> str:
        return self.names[0]

    def model(self, model: str | None) -> int | None:
        """OpenAI's `model` field: absent, or a served name (as OpenAI and vLLM, 404 otherwise), which may name a
        depth: `demo:loops=6` (for clients that can set nothing but the model, lm-eval's loglikelihood requests
        among them). Returns that depth, or None."""
        if model is None or model in self.names:
            return None
        name, _, loops = model.partition(":loops=")
        if name not in self.names:
            raise APIError(404, f"the model {model[:100]!r} does not exist here; this server serves "
                           f"{', '.join(map(repr, self.names))} (GET /v1/models)", "model", code="model_not_found")
        if not re.fullmatch(r"[0-9]{1,9}", loops):
            raise APIError(400, f"model: a depth is written {name}:loops=N, got {model[:100]!r}", "model")
        with as_api_error():
            check_loops(self.config, int(loops), "model")
        return int(loops)

    def depth(self, body: Any, query: int | str | None) -> Depth:
        """The depth: the query's loops, the body's, the model name's, else the trained depth cut to max_loops;
        or "auto" with the policy its companion fields (or the server's defaults) set."""
        cfg = self.config
        with as_api_error():
            for param in ("loops", "max_loops"):  # checked even when the query wins: never silently ignored
                if isinstance(getattr(body, param), int):
                    check_loops(cfg, getattr(body, param), param)
            named = self.model(getattr(body, "model", None))
            loops = next((n for n in (query, body.loops, named) if n is not None), None)
            if isinstance(loops, int):
                check_loops(cfg, loops)
                if body.max_loops is not None and loops > body.max_loops:
                    raise RequestError(f"loops ({loops}) exceeds this request's max_loops ({body.max_loops})",
                                       "max_loops")
            if body.min_loops is not None:  # refused even where it would not be used
                check_loops(cfg, body.min_loops, "min_loops")
            if loops != "auto":  # the companions of "auto" mean nothing here, and are otherwise ignored
                return Depth(min(cfg.max_loops, body.max_loops or cfg.max_loops) if loops is None else loops)
            budget = cfg.max_loops if body.max_loops is None else body.max_loops
            opt = self.options
            min_loops = min(budget, opt.adaptive_min_loops) if body.min_loops is None else body.min_loops
            tolerance = opt.adaptive_tolerance if body.tolerance is None else body.tolerance
            budget, min_loops = check_adaptive(cfg, tolerance, budget, min_loops)  # and no KV budget
            return Depth(None, Adaptive(tolerance, min_loops, budget))

    def admit(self, body: Any, depth: Depth, prompts: list[list[int]], more_stops: list[str]) -> Admitted:
        """The work of a body whose prompts are `prompts` (token ids); `more_stops` are added to its stop strings
        (the chat template's end of turn)."""
        stop = body.stop_list()
        stop += [s for s in more_stops if s not in stop]
        self.check_rows(len(prompts), body)
        max_tokens = body.tokens_to_generate(max(len(p) for p in prompts), self.config.block_size)
        with as_api_error():
            for ids in prompts:
                check_context(self.config, len(ids), max_tokens)
        body.check_tokens(max_tokens)
        self.check_token_ids(body.stop_token_ids or [], "stop_token_ids")
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        return Admitted(prompts, body.candidates(), depth, max_tokens, params, body.seed, stop,
                        self.speculation(body.speculative, depth), body.engine_fields())

    def check_rows(self, prompts: int, body: Any) -> None:
        """Every prompt is one queue entry, and its candidates are admitted together: both must fit."""
        rows, queue = self.options.max_batch, self.options.max_queue
        if body.candidates() > rows:
            param = "n" if body.candidates() == body.n else "best_of"
            raise APIError(400, f"{param} ({body.candidates()}) exceeds the {rows} rows this server decodes together "
                           "(--max-batch)", param)
        if prompts > queue:
            raise APIError(400, f"prompt: {prompts} prompts exceed the {queue} requests this server queues "
                           "(--max-queue); send fewer per request", "prompt")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", param)

    def speculation(self, asked: Any, depth: Depth) -> SpecRequest | None:
        """A request's `speculative` field (or the server's default) as the engine's SpecRequest, or None (plain).
        `auto` quietly stays plain where drafting is impossible; an explicit draft that cannot run is a 400."""
        opt, kv_budget = self.options, self.config.kv_budget
        asked = opt.speculative if asked is None else asked
        if asked == "off" or (depth.adaptive is not None and asked == "auto"):
            return None
        if depth.adaptive is not None:
            raise APIError(400, "speculative decoding and loops \"auto\" do not combine: a draft needs to know "
                           "the depth of the token it stands in for", "speculative")
        loops = depth.loops
        if asked == "auto":
            return SpecRequest(auto=True) if opt.spec_tokens > 0 and kv_budget == 0 and loops > 1 else None
        if opt.spec_tokens == 0:
            raise APIError(400, "self-speculative decoding is off on this server (--spec-tokens 0)", "speculative")
        if kv_budget:
            raise APIError(400, "self-speculative decoding needs one K/V slot per loop; this model shares slots "
                           f"(kv_budget {kv_budget})", "speculative")
        if loops < 2:
            raise APIError(400, f"speculative: a draft runs fewer loops than the request, so self-speculative decoding "
                           f"needs loops >= 2; this request runs {loops}", "speculative")
        if not 1 <= asked.draft_loops < loops:
            raise APIError(400, f"speculative.draft_loops must be in 1..{loops - 1} (below loops, {loops}), got "
                           f"{asked.draft_loops}", "speculative")
        # at most the server's --spec-tokens: a client cannot know the server's lanes, so more is not an error
        return SpecRequest(draft_loops=asked.draft_loops, tokens=min(asked.tokens or 1 << 30, opt.spec_tokens))

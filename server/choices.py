"""One HTTP request's choices: an engine Request per (prompt, candidate), their events merged into one queue.

A body with several prompts (a list of strings or of token-id lists) and `n` (or `best_of`) candidates per prompt
becomes prompts x candidates engine requests. The candidates of one prompt are one group: the first carries the
others as `siblings`, so the engine admits them together and prefills the prompt once; candidate i samples with
seed + i. Every request emits `(choice number, event)` into the handler's one asyncio queue.

    python -m pytest tests/test_api_choices.py -q
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from loopgpt.model import SamplingParams

from .engine import FinishEvent, Request, TokenEvent
from .logprobs import PromptScores
from .schemas import SEED_MAX


@dataclass
class Choice:
    """What one candidate produced: its tokens (with logprobs) and its final event."""

    req: Request
    prompt: int  # which prompt of the body
    candidate: int  # 0 .. candidates - 1 within its prompt
    tokens: list[TokenEvent] = field(default_factory=list)
    scores: PromptScores | None = None  # echo with logprobs: the prompt's
    final: FinishEvent | None = None

    def add(self, ev: Any) -> None:
        if isinstance(ev, TokenEvent):
            self.tokens.append(ev)
        elif isinstance(ev, PromptScores):
            self.scores = ev
        else:
            self.final = ev

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens) + (self.final.text if self.final else "")

    @property
    def logprob(self) -> float:
        """Cumulative log-probability of its tokens (what best_of ranks by)."""
        return -sum(t.nll for t in self.tokens)


def build(prompts: list[list[int]], candidates: int, loops: int, max_tokens: int, params: SamplingParams,
          seed: int | None, emit: Callable[[int], Callable[[Any], None]], **fields: Any) -> list[Choice]:
    """Choices in order (prompt-major); the first of each prompt's group carries the others as siblings."""
    choices: list[Choice] = []
    for p, ids in enumerate(prompts):
        group = [Request(ids, loops, max_tokens, params, emit=emit(len(choices) + i),
                         seed=None if seed is None else (seed + i) % (SEED_MAX + 1), **fields)
                 for i in range(candidates)]
        group[0].siblings = group[1:]
        choices += [Choice(req, p, i) for i, req in enumerate(group)]
    return choices


def leaders(choices: list[Choice]) -> list[Request]:
    """The requests the engine queues: one per prompt (its siblings come along)."""
    return [c.req for c in choices if c.candidate == 0]


async def events(engine: Any, choices: list[Choice], queue: asyncio.Queue, http: Any = None
                 ) -> AsyncIterator[tuple[int, Any]]:
    """(choice number, event) until every choice has finished; aborts those left if the consumer stops early.
    With `http` (non-streaming), polls for a disconnected client; SSE responses detect it themselves."""
    left = len(choices)
    try:
        while left:
            if http is None:  # a stream: the client's departure cancels this generator
                i, ev = await queue.get()
            else:  # wait_for costs a task and a timer per event: only where the client must be polled
                try:
                    i, ev = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    if await http.is_disconnected():
                        return
                    continue
            choices[i].add(ev)
            yield i, ev
            left -= isinstance(ev, FinishEvent)
    finally:
        for c in choices:
            if not c.req.done:
                engine.abort(c.req)


def best(choices: list[Choice], n: int) -> list[Choice]:
    """Per prompt, the n candidates with the highest cumulative logprob (best_of), best first; all when n is
    every candidate, in candidate order."""
    out: list[Choice] = []
    for p in sorted({c.prompt for c in choices}):
        group = [c for c in choices if c.prompt == p]
        out += group if n == len(group) else sorted(group, key=lambda c: -c.logprob)[:n]
    return out


def usage(choices: list[Choice]) -> dict[str, int]:
    """Prompt tokens counted once per prompt, completion tokens of every candidate generated (best_of's too)."""
    prompt = sum(len(c.req.prompt_ids) for c in choices if c.candidate == 0)
    completion = sum(c.final.completion_tokens for c in choices if c.final)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def loops_per_token(choices: list[Choice]) -> float | None:
    """Mean loops of the decoded tokens over every choice (weighted by their tokens)."""
    used = [(c.final.loops_per_token, c.final.completion_tokens) for c in choices
            if c.final and c.final.loops_per_token is not None]
    weight = sum(max(n, 1) for _, n in used)
    return sum(lpt * max(n, 1) for lpt, n in used) / weight if used else None


def timing(choices: list[Choice]) -> dict[str, float | None]:
    finals = [c.final for c in choices if c.final]
    ttfts = [f.ttft_s for f in finals if f.ttft_s is not None]
    e2e = max(f.e2e_s for f in finals)
    tokens = sum(f.completion_tokens for f in finals)
    return {"ttft_s": min(ttfts) if ttfts else None, "e2e_s": e2e, "tokens_per_s": tokens / e2e if e2e > 0 else 0.0}


def totals(choices: list[Choice], loops: int | str) -> dict:
    """The fields every OpenAI response adds after its choices: usage, the depth and what it cost."""
    return {"usage": usage(choices), "loops": loops, "loops_per_token": loops_per_token(choices),
            "timing": timing(choices), "quality": quality(choices)}


def quality(choices: list[Choice]) -> dict[str, float | None]:
    """Mean prompt NLL over the prompts; token NLL over every generated token."""
    prompts = [c.final.prompt_nll for c in choices if c.candidate == 0 and c.final and c.final.prompt_nll is not None]
    tokens = [t.nll for c in choices for t in c.tokens]
    return {"prompt_nll": sum(prompts) / len(prompts) if prompts else None,
            "token_nll": sum(tokens) / len(tokens) if tokens else None}

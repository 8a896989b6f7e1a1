"""What flows between the HTTP side and the engine: a client's Request, the engine's Row state, the events back.

A Request is what the client asked for and never changes once submitted (but for its two status flags); the
engine keeps everything it learns while serving it in a Row: its cache row, its tokens in flight, its counts.

    python -c "from loopgpt.server.engine.request import Request; help(Request)"
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loopgpt.model import SamplingParams, TextStream

from ..logprobs import PromptScores
from .speculation import SpecRequest, Speculation


@dataclass(frozen=True)
class Adaptive:
    """`loops: "auto"`: each token stops looping once its state converged (model/adaptive.py's policy: cosine
    change of the hidden state below `tolerance`, after at least `min_loops`, at most `max_loops`, the budget)."""

    tolerance: float
    min_loops: int
    max_loops: int


@dataclass
class TokenEvent:
    index: int
    token_id: int
    text: str
    nll: float
    entropy: float
    top: list[tuple[int, float]] | None = None  # with Request.logprobs: the likeliest tokens (id, logprob)


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    text: str  # held-back text released at the end (may be "")
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    e2e_s: float
    prompt_nll: float | None
    token_nll: float | None
    error: str | None = None  # with finish_reason "error": what failed, for the client
    loops_per_token: float | None = None  # mean loops of the decoded tokens (the prefilled first one aside)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.e2e_s if self.e2e_s > 0 else 0.0


@dataclass
class Request:
    """What a client asked for; the engine never changes it (only the two status flags)."""

    prompt_ids: list[int]
    loops: int | None  # the depth every token runs; None with `adaptive` (its max_loops is the budget)
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Any], None]  # must be thread-safe: called from the engine thread
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_token: int | None = None
    endpoint: str = "generate"
    arrival: float = field(default_factory=time.perf_counter)
    speculative: SpecRequest | None = None  # self-speculative decoding, or None for plain
    adaptive: Adaptive | None = None  # loops "auto"
    logprobs: int | None = None  # top alternatives reported per generated token (0..5); None: none
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo), from its prefill
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # end the request as EOS does (not in the text)
    priority: int = 0  # lower is admitted first; ties in arrival order
    siblings: list[Request] = field(default_factory=list)  # further choices of this prompt (n > 1): admitted
    # together with it (all rows or none), their prompt copied from its prefill
    rid: int = 0  # the request's id across the engine-process boundary (server/engine/wire.py)
    aborted: bool = False  # set by the HTTP side (client gone); read by the engine at its next turn
    done: bool = False  # set by the engine once the FinishEvent is out

    def __post_init__(self):
        assert (self.loops is None) != (self.adaptive is None), "a request has a depth or an adaptive policy"

    @property
    def deepest(self) -> int:
        """The most loops any token of this request runs: its depth, or the adaptive budget."""
        return self.loops if self.adaptive is None else self.adaptive.max_loops


@dataclass
class Flight:
    """A token in flight: the token at position `pos` runs loop `loop` at the next step."""

    pos: int
    loop: int = 0


@dataclass
class Row:
    """The engine's state of one admitted request: its cache row and the tokens it has in flight."""

    req: Request
    index: int  # KV-cache row
    seed: int
    eos: int
    stream: TextStream
    spec: Speculation | None = None
    prefilled: int = 0  # prompt tokens in the cache
    flights: list[Flight] = field(default_factory=list)  # consecutive positions, oldest (verified input) first
    epoch: int = 0  # bumped when a draft is rejected: head outputs of an older epoch are stale
    sampled: int = 0  # tokens decided (their last loop's head scheduled), delivered or on their way
    n_tokens: int = 0  # tokens delivered (an EOS is not one)
    nll_sum: float = 0.0
    prompt_nll: float | None = None
    first_token_at: float | None = None
    last_token_at: float = 0.0
    awaiting: bool = False  # an adaptive token's exit check is on its way back: it waits for the verdict
    copies: list[tuple[int, int]] = field(default_factory=list)  # (position, exit loop): K/V to copy deeper
    looped: int = 0  # decoded tokens and the loops they used, for loops_per_token
    loops_used: int = 0
    scored: bool = False  # the prompt is scored for the prompt_nll metric (a sampled fraction of requests)
    bans: bool = False  # the runner holds tokens this row may not sample before min_tokens
    fork_of: Row | None = None  # a further choice: its prompt comes from this row's prefill
    children: list[Row] = field(default_factory=list)  # the further choices forked from this row
    prompt_scores: PromptScores | None = None  # echo: the prompt's logprobs, once its prefill is back
    cached: int = 0  # prompt tokens served from the prefix cache
    load: list[Any] | None = None  # their cached blocks, copied into the row with its first prefill chunk
    keys: set[int] | None = None  # a cacheable prompt's block keys (prefix_cache.chain), for requests that wait on it

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.req.prompt_ids) and self.sampled > 0

    def needed(self, pos: int) -> bool:
        """Whether the token at `pos` must run: its last loop decides generated token pos + 1 - prompt."""
        return pos + 1 - len(self.req.prompt_ids) < self.req.max_tokens

    def decided(self, pos: int, successor: bool = True) -> None:
        """The token after `pos` is sampled (its head is launched): count it, and start that token's own flight
        when it is still needed (`successor` False: a draft already flies in its place)."""
        self.sampled += 1
        if successor and self.needed(pos + 1):
            self.flights.append(Flight(pos + 1))


@dataclass
class Sampled:
    """What the host remembers of one head row until its output comes back."""

    row: Row
    epoch: int
    mode: int
    pos: int  # position of the token whose head ran
    loops: int = 0  # loops that token used (0: the prefill's first token)
    entry: int = -1  # adaptive: the decode entry whose convergence decides whether the token stops here



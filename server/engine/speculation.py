"""Self-speculative decoding policy: how far ahead a request drafts from its own early loops.

A looped model is its own draft model: the first k of a request's N loops are exactly what full decoding
computes for those loops, so after a token's loop k the head can draft its successor, which starts looping
while the token itself runs loops k+1..N (a pipeline across loop stages, WaveFront-style: the engine keeps up
to `tokens` drafts in flight per request, each in its own lane). When the token's last loop disagrees with
the draft, the drafts in flight are discarded and the corrected token starts over. Greedy output is
identical to plain decoding; sampled output keeps its distribution (speculative acceptance, model/sampling.py).

`auto` starts at k = N // 3 and moves k with the request's own acceptance rate; it stops drafting for a
request whose drafts keep failing at every k, and the engine stops all auto drafting while the batch is
large (there the extra lanes cost more than the shorter wait saves: `loopgpt bench --rows 9` measures where).

    python -m pytest tests/test_speculative.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

EMA = 0.2  # weight of the newest verification in the acceptance rate
WINDOW = 8  # verifications between two changes of k under auto


@dataclass(frozen=True)
class SpecRequest:
    """What a client asked for: fixed draft loops / drafts in flight, or `auto`."""

    draft_loops: int = 0  # k; 0 with auto: chosen by the policy
    tokens: int = 0  # drafts in flight; 0 with auto: as many as the engine allows
    auto: bool = False


class Speculation:
    """One request's drafting state: k, drafts in flight, acceptance rate."""

    def __init__(self, request: SpecRequest, loops: int, max_tokens_in_flight: int):
        self.auto = request.auto
        self.loops = loops
        self.k = request.draft_loops or max(1, loops // 3)
        self.m = min(request.tokens or max_tokens_in_flight, max_tokens_in_flight)
        self.rate = 0.7  # prior acceptance rate
        self.seen = 0
        self.verified = self.accepted = 0

    @property
    def active(self) -> bool:
        return 1 <= self.k < self.loops and self.m >= 1

    def record(self, accepted: bool) -> None:
        """One verification; under auto, every WINDOW of them may move k (or turn drafting off)."""
        self.verified += 1
        self.accepted += accepted
        self.rate = (1 - EMA) * self.rate + EMA * float(accepted)
        self.seen += 1
        if not self.auto or self.seen < WINDOW:
            return
        self.seen = 0
        if self.rate > 0.85 and self.k > 1:
            self.k -= 1  # drafts from fewer loops are cheaper and still accepted
        elif self.rate < 0.5:
            self.k += 1  # deeper drafts agree more often; at k = loops drafting is off

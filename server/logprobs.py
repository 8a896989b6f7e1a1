"""Log-probabilities: from the head's and the prefill's output columns to OpenAI's two shapes.

The engine reports, per generated token, its log-probability under the request's own-depth, untempered
distribution (the head's NLL column) and, when asked, the TOP_LOGPROBS likeliest tokens; the prefill reports the
same for each prompt token after the first (echo). This module turns them into `/v1/completions`' `logprobs`
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`; the sampled token is always among its top, as OpenAI
does, so there may be k + 1 entries) and `/v1/chat/completions`' (`content: [{token, logprob, bytes,
top_logprobs}]`).

    python -m pytest tests/test_api_logprobs.py -q
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loopgpt.model import Tokenizer
from loopgpt.model.step import TOP_LOGPROBS


@dataclass
class PromptScores:
    """Engine event, before a request's first token when it asked for prompt logprobs: each prompt token after
    the first, its log-probability and its top alternatives."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


def top_pairs(columns: list[float], k: int) -> list[tuple[int, float]]:
    """The k likeliest (id, logprob) from a row's top columns: TOP_LOGPROBS values, then their ids."""
    return [(int(columns[TOP_LOGPROBS + j]), columns[j]) for j in range(k)]


def prompt_scores(table: list[list[float]], k: int) -> PromptScores:
    """A prefill's score rows ([logprob, top values, top ids] per prompt position) as PromptScores."""
    return PromptScores([r[0] for r in table], [top_pairs(r[1:], k) for r in table])


class CompletionLogprobs:
    """`/v1/completions`' logprobs of one choice, token by token: `add` returns the fragment for a stream chunk
    and keeps the whole for a JSON response. `text_offset` counts characters of the choice's text (the echoed
    prompt included)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.whole: dict[str, list] = empty()
        self.offset = 0

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict[str, list]:
        text = self.tokenizer.decode([token])
        alternatives = None
        if top is not None:
            alternatives = {self.tokenizer.decode([t]): lp for t, lp in top}
            alternatives.setdefault(text, logprob)  # the sampled token is always reported
        part = {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": [alternatives],
                "text_offset": [self.offset]}
        self.offset += len(text)
        for key, values in part.items():
            self.whole[key] += values
        return part

    def prompt(self, ids: list[int], scores: PromptScores) -> dict[str, list]:
        """The echoed prompt: the first token has no logprob (nothing precedes it), the others their scores."""
        part = self.add(ids[0], None, None)
        for token, lp, top in zip(ids[1:], scores.logprobs, scores.top, strict=False):
            for key, values in self.add(token, lp, top).items():
                part[key] += values
        return part


def empty() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def chat_entry(tokenizer: Tokenizer, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
    """One token of `/v1/chat/completions`' `logprobs.content`: the token, its logprob and bytes, its top k."""
    def one(t: int, lp: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}
    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}

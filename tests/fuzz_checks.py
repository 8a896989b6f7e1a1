"""Schemathesis hooks for tests/test_server_fuzz.py (loaded through SCHEMATHESIS_HOOKS): one check.

`positive_data_acceptance_here` is schemathesis's own `positive_data_acceptance` (a schema-valid request
must not be rejected) with exactly these rejections that a JSON Schema cannot state, all documented 400s:

- `context_length_exceeded`: prompt + max_tokens must fit the context, counted in tokens, not characters;
- one field bounded by another: `speculative.draft_loops` below the request's own `loops` (so no draft at
  `loops` 1); `best_of` at least `n`; `min_tokens` at most `max_tokens`; `loops` at most `max_loops`;
  `top_logprobs` only with `logprobs`; `min_loops` at most `max_loops`; an explicit `speculative` not with
  `loops: "auto"`; `messages` with a user's message, not only system or developer instructions;
- `best_of` > `n` with `stream` (the best are known only at the end);
- /tokenize takes `prompt` or `messages`, one of them (both may be null in its schema);
- an integer field written as a float (`"loops": 4.0`): JSON Schema's `integer` admits 4.0, while our one
  type rule is OpenAI's strict one (no number is read from a string, no integer from a float).

Everything else schema-valid must be accepted, and the built-in check runs unchanged on every other case.

    SCHEMATHESIS_HOOKS=tests/fuzz_checks.py schemathesis run URL/openapi.json --checks all \\
        --exclude-checks positive_data_acceptance
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

CROSS_FIELD = ("speculative.draft_loops must be in", "best_of (", "min_tokens (", "top_logprobs needs logprobs",
               "best_of > n cannot stream", "give either prompt or messages", "loops (",  # loops (8) exceeds max_loops
               "speculative decoding and loops", "speculative: a draft runs fewer loops",  # at loops 1
               "messages holds only system or developer")  # a conversation needs a user's message


def integral_float(value: Any) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, list):
        return any(integral_float(v) for v in value)
    if isinstance(value, dict):  # a nested object (`speculative`)
        return any(integral_float(v) for v in value.values())
    return False


def explained(response: Any, case: Any) -> bool:
    """A 400 whose error is one of the rejections a schema cannot state (see the module docstring)."""
    if response.status_code != 400:
        return False
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    message = str(error.get("message", ""))
    min_above_max = message.startswith("min_loops must be in") and "(max_loops)" in message
    if error.get("code") == "context_length_exceeded" or message.startswith(CROSS_FIELD) or min_above_max:
        return True
    param = error.get("param")
    body = case.body if isinstance(case.body, dict) else {}
    query = case.query or {}
    return param is not None and (integral_float(body.get(param)) or integral_float(query.get(param)))


@schemathesis.check
def positive_data_acceptance_here(ctx: Any, response: Any, case: Any) -> bool | None:
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if explained(response, case):
            return None
        raise

"""Reference generation: prefill the prompt, then decode one token at a time with the KV cache.

`loopgpt generate` uses it, and the serving engine's tests use it as their oracle.

    loopgpt generate --checkpoint checkpoints/demo --prompt "Once upon a time" --loops 6 --seed 0
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import LoopGPTConfig
from .gpt import LoopGPT
from .kv_cache import KVCache
from .sampling import SamplingParams, fresh_seed, sample_row
from .tokenizer import Tokenizer


class RequestError(ValueError):
    """A request outside the model's limits: the sentence, the field at fault (`param`) and, where OpenAI has one,
    its error code, so that the server's 400 and `loopgpt generate`'s exit say the same thing."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_loops(config: LoopGPTConfig, loops: int, param: str = "loops") -> None:
    if not 1 <= loops <= config.loop_cap:
        raise RequestError(f"{param} must be in 1..{config.loop_cap}, got {loops}", param)


def check_context(config: LoopGPTConfig, n_prompt: int, max_tokens: int) -> None:
    """A prompt of `n_prompt` tokens and `max_tokens` more must fit the context."""
    if n_prompt < 1:
        raise RequestError("prompt is empty: give at least one token of text", "prompt")
    if n_prompt >= config.block_size:
        raise RequestError(f"prompt ({n_prompt} tokens) fills the context of {config.block_size} tokens; shorten it",
                           "prompt", "context_length_exceeded")
    if n_prompt + max_tokens > config.block_size:
        raise RequestError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{config.block_size} tokens; shorten the prompt or lower max_tokens", "max_tokens",
                           "context_length_exceeded")


def check_request(model: LoopGPT, n_prompt: int, max_tokens: int, loops: int) -> None:
    """The limits a request must respect, as sentences a client can act on (the server's are the same)."""
    check_loops(model.config, loops)
    if max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    check_context(model.config, n_prompt, max_tokens)


@torch.inference_mode()
def generate_tokens(
    model: LoopGPT,
    prompt: list[int],
    loops: int,
    max_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    eos_token: int | None = None,
) -> Iterator[int]:
    """Token ids, one per step; stops after `max_tokens` or after yielding `eos_token`.

    The reference decode loop (prefill, then one full-depth cached forward per token): `loopgpt generate`,
    the benchmarks and the engine's tests use it. Token i is sampled with (seed, counter i), as the engine
    samples it, so a seeded request gets the same tokens here and from the server."""
    check_request(model, len(prompt), max_tokens, loops)
    params = params or SamplingParams()
    seed = fresh_seed() if seed is None else seed
    device, dtype = _device_dtype(model)
    cache = KVCache(model.config, 1, max_len=len(prompt) + max_tokens, loops=loops, device=device, dtype=dtype)
    logits, _ = model(torch.tensor([prompt], device=device), loops, kv_cache=cache)
    for i in range(max_tokens):
        token = sample_row(logits[0, -1], params, seed, i)
        yield token
        if token == eos_token or i == max_tokens - 1:
            return
        logits, _ = model(torch.tensor([[token]], device=device), loops, kv_cache=cache)


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    weight = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)


class TextStream:
    """Token ids in, text out: UTF-8-safe, and holds back text that may be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in (stop or []) if s]
        self.pending = ""  # decoded but not yet emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text safe to emit after this token; sets `stopped` when a stop string appeared."""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending, self.stopped = self.pending[:at], "", True
                return out
        keep = 0 if final else max((_overlap(self.pending, s) for s in self.stop), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length"


def generate_text(
    model: LoopGPT,
    tokenizer: Tokenizer,
    prompt: str,
    loops: int,
    max_tokens: int,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> Iterator[tuple[str, Completion]]:
    """(new text, completion so far) per token; the last completion carries the finish reason."""
    completion = Completion()
    stream = TextStream(tokenizer, stop)
    ids = tokenizer.encode(prompt)
    for token in generate_tokens(model, ids, loops, max_tokens, params, seed, tokenizer.eot_token):
        if token == tokenizer.eot_token:
            completion.finish_reason = "stop"
            break
        completion.token_ids.append(token)
        piece = stream.push(token)
        completion.text += piece
        if stream.stopped:
            completion.finish_reason = "stop"
            yield piece, completion
            return
        yield piece, completion
    tail = stream.finish()
    completion.text += tail
    yield tail, completion

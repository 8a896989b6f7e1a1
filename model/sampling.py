"""Token sampling for a whole batch on the device: greedy, temperature, top-k, top-p, seeded per request.

Randomness is counter-based: the noise for token `counter` of a request is a hash of (seed, counter,
vocabulary id), not a draw from a stateful generator. So a seeded request samples the same tokens
whatever shares its batch, sampling of many rows is one batched call with no host round trip (it can
be captured in a CUDA graph), and the reference generation and the engine agree token for token.

    python -c "import torch; from loopgpt.model import *; print(sample_row(torch.randn(9), SamplingParams(0.8), 1, 0))"
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature below this is greedy (vLLM's rule): dividing by it overflows float32
SEED_MAX = 2**63 - 1
_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    temperature: float = 1.0  # below GREEDY_BELOW (0 included) means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter; the likeliest token is always kept

    def __post_init__(self):
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def fresh_seed() -> int:
    """A seed for a request that gave none."""
    return secrets.randbelow(SEED_MAX)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) without overflowing int64 (16-bit halves)."""
    return (((x >> 16) * c & 0xFFFF) << 16) + (x & 0xFFFF) * c & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (lowbias32) of an int64 tensor holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


# Noise streams: independent draws for the same (seed, token index). Plain sampling uses TARGET only;
# self-speculative decoding also draws its draft, its acceptance test and its resample from their own streams.
TARGET, DRAFT, ACCEPT, RESIDUAL = range(4)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int, stream: int = TARGET) -> torch.Tensor:
    """(B, V) float32 in (0, 1), a pure function of (seed (B,), counter (B,), stream, vocabulary id)."""
    counter = (counter & 0x3FFFFFFF) + (stream << 30)  # token indices stay far below 2**30
    key = _hash32(seed & _M32 ^ _hash32((seed >> 32) & _M32 ^ _hash32(counter & _M32)))  # (B,)
    ids = torch.arange(vocab, device=seed.device, dtype=torch.long)
    h = _hash32((key[:, None] + _mul32(ids, 0x9E3779B1)[None, :]) & _M32)  # (B, V)
    # 23 bits, offset by half a step: exactly representable in float32, never 0 or 1.
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) with the tokens outside each row's top-k, then top-p, set to -inf (k 0, p 1: no filter)."""
    V = logits.shape[-1]
    ordered = logits.sort(dim=-1, descending=True).values  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V) - 1
    kth = ordered.gather(1, k[:, None])  # (B, 1) the k-th largest value
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    first = torch.arange(V, device=logits.device) == 0  # the likeliest token stays whatever top_p (even 0 in fp32)
    keep = (probs.cumsum(dim=-1) - probs < top_p[:, None]) | first  # keeps the token that crosses p
    cut = ordered.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1) smallest kept value
    return logits.masked_fill(logits < torch.maximum(kth, cut), float("-inf"))


def tempered(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             filtered: bool = True) -> torch.Tensor:
    """float32 logits (B, V) divided by each row's temperature (greedy rows: by 1) and filtered."""
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits.float() / t
    return filter_logits(scaled, top_k, top_p) if filtered else scaled


def draw(scaled: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, stream: int = TARGET) -> torch.Tensor:
    """One token per row from softmax(scaled) (B, V): Gumbel-max with counter-based noise."""
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, scaled.shape[-1], stream)))
    return (scaled + gumbel).argmax(dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, random: bool = True, filtered: bool = True,
           stream: int = TARGET) -> torch.Tensor:
    """One token per row of logits (B, V): argmax where temperature is 0, else a draw from the tempered,
    filtered distribution. `random`/`filtered` False skip the work no row needs (all greedy / no top-k or
    top-p); they must not change the result."""
    greedy = logits.float().argmax(dim=-1)
    if not random:
        return greedy
    drawn = draw(tempered(logits, temperature, top_k, top_p, filtered), seed, counter, stream)
    return torch.where(temperature > 0, drawn, greedy)


def verify(target: torch.Tensor, draft_logits: torch.Tensor, draft: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor,
           random: bool = True, filtered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance (Leviathan et al. 2023; Chen et al. 2023) of `draft` tokens (B,), drawn from the
    draft logits (B, V), against the target logits (B, V): (token, accepted) per row.

    Greedy rows accept when the draft is the target's argmax and return the argmax either way. Sampling rows
    accept with probability min(1, p(d) / q(d)) and otherwise draw from normalize(max(p - q, 0)), so the token
    is distributed exactly as a plain draw from p, whatever q was."""
    greedy = target.float().argmax(dim=-1)
    if not random:
        return greedy, greedy == draft
    p = torch.softmax(tempered(target, temperature, top_k, top_p, filtered), dim=-1)  # (B, V)
    q = torch.softmax(tempered(draft_logits, temperature, top_k, top_p, filtered), dim=-1)
    pd, qd = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    u = uniform_noise(seed, counter, 1, ACCEPT)[:, 0]
    accept = u * qd < pd  # u < p/q without dividing by a q that could underflow
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)  # p == q: nothing to correct
    resampled = draw(torch.log(residual), seed, counter, RESIDUAL)
    sampled = torch.where(accept, draft, resampled)
    return torch.where(temperature > 0, sampled, greedy), torch.where(temperature > 0, accept, greedy == draft)


def sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, counter: int) -> int:
    """One token id from one row of logits (V,): token `counter` of a request seeded with `seed`."""
    dev = logits.device
    token = sample(logits[None], torch.tensor([params.temperature], device=dev),
                   torch.tensor([params.top_k], device=dev), torch.tensor([params.top_p], device=dev),
                   torch.tensor([seed], device=dev), torch.tensor([counter], device=dev),
                   random=not params.greedy, filtered=params.filtered)
    return int(token[0])


def token_stats(logits: torch.Tensor, tokens: torch.Tensor, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL of `tokens` (B,) and entropy under the model's own (untempered) distribution, float32; the logits
    must be finite. Without `entropy` its column is NaN: the NLL needs one logsumexp over the vocabulary, the entropy
    a softmax and a product more, about 2-4x the NLL's cost on a CPU at 32 rows of GPT-2's vocabulary
    (scripts/head_cost.py). The NLL is computed the same way either way: a token's logprob never depends on it."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (B,)
    nll = lse - logits.gather(1, tokens[:, None]).squeeze(1)
    if not entropy:
        return nll, torch.full_like(nll, float("nan"))
    p = torch.exp(logits - lse[:, None])  # (B, V)
    return nll, lse - (p * logits).sum(dim=-1)  # -sum p log p, with log p = logits - lse

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


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) float32 in (0, 1), a pure function of (seed (B,), counter (B,), vocabulary id)."""
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


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, random: bool = True, filtered: bool = True) -> torch.Tensor:
    """One token per row of logits (B, V): argmax where temperature is 0, else a draw from the tempered,
    filtered distribution (Gumbel-max with counter-based noise). `random`/`filtered` False skip the work no
    row needs (all greedy / no top-k or top-p); they must not change the result."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if not random:
        return greedy
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    if filtered:
        scaled = filter_logits(scaled, top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, logits.shape[-1])))
    drawn = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


def sample_row(logits: torch.Tensor, params: SamplingParams, seed: int, counter: int) -> int:
    """One token id from one row of logits (V,): token `counter` of a request seeded with `seed`."""
    dev = logits.device
    token = sample(logits[None], torch.tensor([params.temperature], device=dev),
                   torch.tensor([params.top_k], device=dev), torch.tensor([params.top_p], device=dev),
                   torch.tensor([seed], device=dev), torch.tensor([counter], device=dev),
                   random=not params.greedy, filtered=params.filtered)
    return int(token[0])


def token_stats(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL of `tokens` (B,) and entropy under the model's own (untempered) distribution, float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    nll = -logp.gather(1, tokens[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(dim=-1)  # 0 * log 0 is 0, not NaN
    return nll, entropy

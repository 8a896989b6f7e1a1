"""LoopGPTConfig: the one dataclass that describes a loop-residual GPT, saved as config.json.

    python -c "from loopgpt.model.config import preset; print(preset('gpt2-81m-loop'))"
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GATES = ("none", "vector")


class ConfigError(ValueError):
    """A config value a user gave (file, CLI flag or preset name) is not usable."""


@dataclass
class LoopGPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # context length in tokens
    n_layer: int = 12  # distinct blocks in the stack
    n_head: int = 12
    n_embd: int = 768
    max_loops: int = 1  # outer loops the checkpoint was trained for
    inner_loops: int = 1  # applications of each layer per outer loop, fixed by the checkpoint
    loop_cap: int = 0  # hard safety cap on requested loops; 0 means 4 * max_loops
    gate: str = "none"  # "none": x + f(x); "vector": x + a_n * f(x), a_n learned per loop
    bias: bool = True
    dropout: float = 0.0
    kv_budget: int = 0  # K/V slots kept per layer and inner loop; 0 means one per loop (no cap)
    tokenizer: str = "gpt2"  # a tiktoken encoding name, or "bpe" for tokenizer files beside the weights
    eot_token: int = 50256  # end-of-text id, used as EOS by generation
    extra: dict = field(default_factory=dict)  # free-form provenance (training command, data)

    def __post_init__(self):
        ints = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "max_loops", "inner_loops")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config {name} must be a positive integer, got {value!r}")
        if self.loop_cap == 0:
            self.loop_cap = 4 * self.max_loops
        if not isinstance(self.loop_cap, int) or self.loop_cap < self.max_loops:
            raise ConfigError(
                f"config loop_cap must be an integer >= max_loops ({self.max_loops}), got {self.loop_cap!r}"
            )
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"config n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.gate not in GATES:
            raise ConfigError(f"config gate must be one of {', '.join(GATES)}, got {self.gate!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.kv_budget, int) or self.kv_budget < 0:
            raise ConfigError(f"config kv_budget must be 0 (no cap) or positive, got {self.kv_budget!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError("config tokenizer must be a tiktoken encoding name such as 'gpt2', or 'bpe'")
        if not 0 <= self.eot_token < self.vocab_size:
            raise ConfigError(f"config eot_token ({self.eot_token}) must be below vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def kv_slots(self, loops: int) -> int:
        """Number of K/V slots a cache needs to run up to `loops` outer loops."""
        kept = loops if self.kv_budget == 0 else min(loops, self.kv_budget)
        return kept * self.n_layer * self.inner_loops

    def num_params(self) -> int:
        """Parameters of a LoopGPT of this config, position embeddings included, the tied head counted once:
        known before anything is allocated, so a loader can refuse a model that cannot fit."""
        d, bias = self.n_embd, int(self.bias)
        norm = d * (1 + bias)
        attn = d * 3 * d + 3 * d * bias + d * d + d * bias
        mlp = d * 4 * d + 4 * d * bias + 4 * d * d + d * bias
        gates = (self.max_loops - 1) * d if self.gate == "vector" and self.max_loops > 1 else 0
        return (self.vocab_size + self.block_size) * d + self.n_layer * (2 * norm + attn + mlp) + norm + gates

    def kv_cache_bytes(self, batch: int, max_len: int | None = None, loops: int | None = None,
                       dtype_bytes: int = 4) -> int:
        """Bytes of a KVCache of `batch` rows of `max_len` positions (default: the context) serving up to `loops`
        outer loops (default: loop_cap): K and V, one (H, T, D) block per slot and row."""
        slots = self.kv_slots(loops or self.loop_cap)
        return 2 * slots * batch * (max_len or self.block_size) * self.n_embd * dtype_bytes

    def slot(self, loop: int, layer: int, j: int) -> int:
        """Slot of the (outer loop, layer, inner loop) application, as DESIGN.md defines it."""
        return (self.kept_loop(loop) * self.n_layer + layer) * self.inner_loops + j

    def kept_loop(self, loop: int | torch.Tensor) -> int | torch.Tensor:
        """The loop whose K/V slots loop `loop` uses. With a KV budget b >= 2, loop 0 keeps a slot of its own and the
        deeper loops share the other b - 1 in turn: loop 0 is the one every token's first pass reads, and giving
        its slot to a deep loop (the plain `loop mod b`) cost the demo 3 nats where this costs ~0.07
        (docs/results.md). b = 1: one slot for every loop. `loop` may be a tensor of loops (branch-free, on the
        device, as the engine's per-row slots need)."""
        b = self.kv_budget
        if b == 0:
            return loop
        if b == 1:
            return loop * 0
        return (loop != 0) * (1 + (loop - 1) % (b - 1))

    def with_kv_budget(self, budget: int) -> LoopGPTConfig:
        """A validated copy with `kv_budget=budget`: loops share K/V slots (see `kept_loop`).

        The weights do not depend on it, so it may be set at load time: `model.config =
        model.config.with_kv_budget(b)` before any KVCache is built (what `loopgpt eval --kv-budget` does, and
        what a `serve --kv-budget` flag would do). A token then keeps budget / loops of the K/V it would keep
        without sharing; decoding reads earlier tokens' K/V of the latest loop with the same residue."""
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= self.loop_cap:
            raise ConfigError(f"kv_budget must be 0 (one K/V slot per loop) or 1..{self.loop_cap} (the loop cap), "
                              f"got {budget!r}")
        return dataclasses.replace(self, kv_budget=budget)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> LoopGPTConfig:
        """Strict: every field must be present and no unknown key is accepted."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown:
            raise ConfigError(f"{source}: unknown config key(s) {', '.join(unknown)}")
        if missing:
            raise ConfigError(f"{source}: missing config key(s) {', '.join(missing)}")
        return cls(**data)


_GPT2 = dict(vocab_size=50257, block_size=1024, n_head=12, n_embd=768, tokenizer="gpt2", eot_token=50256)

PRESETS: dict[str, dict] = {
    # The papers' configurations (GPT-2 tokenizer, d=768, 12 heads, context 1024).
    "gpt2-124m": dict(_GPT2, n_layer=12, max_loops=1),
    "gpt2-81m-loop": dict(_GPT2, n_layer=6, max_loops=6),
    "gpt2-67m-loop": dict(_GPT2, n_layer=4, max_loops=6, inner_loops=2),
    "gpt2-45m": dict(_GPT2, n_layer=1, max_loops=1),
    "gpt2-45m-loop": dict(_GPT2, n_layer=1, max_loops=2),
    # CPU-sized presets: `demo` is the shipped checkpoint's shape, `tiny` is for tests.
    "demo": dict(vocab_size=2048, block_size=256, n_layer=2, n_head=6, n_embd=192, max_loops=6,
                 gate="vector", tokenizer="bpe", eot_token=2047),
    "tiny": dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32, max_loops=4,
                 gate="vector", tokenizer="bpe", eot_token=511),
}


def preset(name: str, **overrides) -> LoopGPTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LoopGPTConfig(**{**PRESETS[name], **overrides})

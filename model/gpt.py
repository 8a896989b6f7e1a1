"""LoopGPT: a GPT-2 block stack applied `loops` times with shared weights (loop-residual update).

    x_0 = wte(idx) + wpe(pos)
    x_n = x_{n-1} + a_n * (Stack(x_{n-1}) - x_{n-1})      a_0 = 1; gate "none" means a_n = 1

so a gate of 1 is exactly an unrolled GPT-2 of n_layer * loops layers with tied weights. `loops` may
give one count per row: loop n then runs only on the rows whose count exceeds n. The model is three
primitives (embed, loop_body, head: the contract of `model/forward.py`); `loop_body` also takes one
loop index per row, which is what the continuous-depth engine step (`model/step.py`) runs.

    python -c "from loopgpt.model import LoopGPT, preset; print(LoopGPT(preset('tiny')).num_params())"
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import forward as contract
from .config import LoopGPTConfig
from .forward import Loops
from .kv_cache import CacheAccess, KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, access: CacheAccess | None = None, offset: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        if access is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # is_causal would align the mask top-left, wrong with a past: the mask comes from positions.
            access.write(offset, k, v)
            k, v = access.read(offset)  # (B, H, ctx, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=access.mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm GPT-2 block; keeps its own two internal residuals."""

    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, access: CacheAccess | None = None, offset: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), access, offset)
        return x + self.mlp(self.ln_2(x))


class LoopGPT(nn.Module):
    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as GPT-2
        if config.gate == "vector" and config.max_loops > 1:
            # a_1 .. a_{max_loops-1}; a_0 is the constant 1 so the first loop sees the embeddings whole.
            self.loop_gates = nn.Parameter(torch.ones(config.max_loops - 1, config.n_embd))
        else:
            self.register_parameter("loop_gates", None)
        self.apply(self._init_weights)
        depth = config.n_layer * config.inner_loops * config.max_loops  # block applications per token
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT (and the papers) it leaves out position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def gate(self, n: int) -> torch.Tensor | None:
        """Gate a_n of outer loop n (0-based); loops beyond the trained ones reuse the last gate."""
        if self.loop_gates is None or n == 0:
            return None
        return self.loop_gates[min(n, self.config.max_loops - 1) - 1]

    def stack(self, x: torch.Tensor, access: CacheAccess | None = None) -> torch.Tensor:
        """Stack(x) for one outer loop: every layer, each applied inner_loops times."""
        inner = self.config.inner_loops
        for i, block in enumerate(self.transformer.h):
            for j in range(inner):
                x = block(x, access, i * inner + j)
        return x

    # ---- the three primitives of the forward contract (model/forward.py) ----

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)

    def loop_body(self, x: torch.Tensor, loop: int | torch.Tensor, access: CacheAccess | None = None) -> torch.Tensor:
        """x_{n+1} = x_n + a_n * (Stack(x_n) - x_n) for x (B, T, C) at loop n (int, or (B,) per row)."""
        s = self.stack(x, access)
        if isinstance(loop, int):
            a = self.gate(loop)
            return s if a is None else x + a * (s - x)
        if self.loop_gates is None:
            return s
        # Per-row loops: gate a_n is loop_gates[n - 1], the last one past the trained depth; loop 0's pick is never
        # used (loop 0 takes Stack(x) whole, bit for bit as the int path).
        a = self.loop_gates[(loop - 1).clamp(0, self.config.max_loops - 2)][:, None, :]  # (B, 1, C)
        return torch.where((loop == 0)[:, None, None], s, x + a * (s - x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

    def forward(
        self,
        idx: torch.Tensor,
        loops: Loops = None,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and the loss when `targets` (B, T) is given (-1 is ignored).

        `loops` is one count or one per row; the cache arguments are `model/forward.py`'s."""
        logits = contract.forward(self, idx, loops, kv_cache, rows, pos)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

"""LoopGPT: a GPT-2 block stack applied `loops` times with shared weights (loop-residual update).

    x_0 = wte(idx) + wpe(pos)
    x_n = x_{n-1} + a_n * (Stack(x_{n-1}) - x_{n-1})      a_0 = 1; gate "none" means a_n = 1

so a gate of 1 is exactly an unrolled GPT-2 of n_layer * loops layers with tied weights. `loops` may
be a tensor with one count per row: loop n then runs only on the rows whose count exceeds n.

    python -c "from loopgpt.model import LoopGPT, preset; print(LoopGPT(preset('tiny')).num_params())"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LoopGPTConfig
from .kv_cache import KVCache


@dataclass
class CacheStep:
    """Where one attention application reads and writes its K/V in a KVCache."""

    cache: KVCache
    slot: int
    rows: torch.Tensor  # (B,) cache rows of the batch rows
    read_rows: torch.Tensor | slice  # the same rows, as a slice when consecutive (reads become views)
    pos: torch.Tensor  # (B, T) absolute positions of the new tokens
    mask: torch.Tensor  # (B, 1, T, L) True where a query may attend to a key


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LoopGPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, step: CacheStep | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        if step is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # is_causal would align the mask top-left, wrong with a past: the mask comes from positions.
            step.cache.write(step.slot, step.rows, step.pos, k, v)
            k, v = step.cache.read(step.slot, step.read_rows, step.mask.shape[-1])  # (B, H, L, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, dropout_p=dropout)
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

    def forward(self, x: torch.Tensor, step: CacheStep | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step)
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

    def stack(self, x: torch.Tensor, n: int, steps: list[CacheStep | None]) -> torch.Tensor:
        """Stack(x) for outer loop n: every layer, each applied inner_loops times."""
        cfg = self.config
        for i, block in enumerate(self.transformer.h):
            for j in range(cfg.inner_loops):
                x = block(x, steps[cfg.slot(n, i, j)] if steps else None)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        loops: int | torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and the loss when `targets` (B, T) is given (-1 is ignored).

        With `kv_cache`, batch row b is cache row `rows[b]` (default b), new tokens sit at `pos`
        (default: right after each row's cached length) and the cache lengths advance.
        """
        cfg = self.config
        B, T = idx.shape
        row_loops = self._check_loops(loops, B, idx.device)
        if kv_cache is not None:
            rows = torch.arange(B, device=idx.device) if rows is None else rows
            if pos is None:
                pos = kv_cache.lengths[rows][:, None] + torch.arange(T, device=idx.device)  # (B, T)
            self._check_cache(kv_cache, row_loops, pos)
        elif pos is None:
            pos = torch.arange(T, device=idx.device)[None, :].expand(B, T)
        if T > cfg.block_size or int(pos.max()) >= cfg.block_size:
            raise ValueError(f"sequence reaches position {int(pos.max())}, beyond the context of {cfg.block_size}")

        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        mask = None
        if kv_cache is not None:
            length = int(pos.max()) + 1
            mask = torch.arange(length, device=pos.device)[None, None, None, :] <= pos[:, None, :, None]  # (B,1,T,L)
        for n in range(int(row_loops.max())):
            active = (row_loops > n).nonzero().squeeze(1)
            whole = active.numel() == B
            xa = x if whole else x[active]
            steps = self._cache_steps(kv_cache, rows, pos, mask, None if whole else active, n)
            s = self.stack(xa, n, steps)
            a = self.gate(n)
            xa = s if a is None else xa + a * (s - xa)
            x = xa if whole else x.index_copy(0, active, xa)
        if kv_cache is not None:
            kv_cache.lengths[rows] = pos[:, -1] + 1
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _check_loops(self, loops: int | torch.Tensor | None, B: int, device) -> torch.Tensor:
        cap = self.config.loop_cap
        if loops is None:
            loops = self.config.max_loops
        if isinstance(loops, int):
            if not 1 <= loops <= cap:
                raise ValueError(f"loops must be in 1..{cap}, got {loops}")
            return torch.full((B,), loops, dtype=torch.long, device=device)
        loops = loops.to(device=device, dtype=torch.long)
        if loops.shape != (B,):
            raise ValueError(f"per-row loops must have shape ({B},), got {tuple(loops.shape)}")
        if int(loops.min()) < 1 or int(loops.max()) > cap:
            raise ValueError(f"loops must be in 1..{cap}, got {loops.tolist()}")
        return loops

    def _check_cache(self, cache: KVCache, row_loops: torch.Tensor, pos: torch.Tensor) -> None:
        if int(row_loops.max()) > cache.loops:
            raise ValueError(f"KV cache holds {cache.loops} loops, {int(row_loops.max())} requested")
        if int(pos.max()) >= cache.max_len:
            raise ValueError(f"position {int(pos.max())} is beyond the KV cache length {cache.max_len}")

    def _cache_steps(self, cache, rows, pos, mask, active, n: int) -> list[CacheStep | None] | None:
        """One CacheStep per slot touched by outer loop n, restricted to the active rows."""
        if cache is None:
            return None
        if active is not None:
            rows, pos, mask = rows[active], pos[active], mask[active]
        read_rows = cache.row_index(rows)
        cfg = self.config
        steps: list[CacheStep | None] = [None] * cfg.kv_slots(cache.loops)
        for i in range(cfg.n_layer):
            for j in range(cfg.inner_loops):
                s = cfg.slot(n, i, j)
                steps[s] = CacheStep(cache, s, rows, read_rows, pos, mask)
        return steps

"""The torch modules that become ONNX graphs: embed, one outer loop ("loop body"), head, and the whole model.

Every graph reads the LoopGPT's own weights (nothing is copied or re-initialised), takes positions as a
tensor and gets its past K/V as an input; the K/V of the new tokens come back as outputs, so the caller
owns the cache (the runtime writes them into a `loopgpt.model.KVCache`). Attention masks are built from
positions, never with `is_causal`, which is wrong with a past (it aligns the mask top-left).

    python -c "from loopgpt.export.graphs import LoopBody; from loopgpt.model import LoopGPT, preset; \
print(LoopBody(LoopGPT(preset('tiny'))))"
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from loopgpt.model import LoopGPT


def attention_mask(pos: torch.Tensor, past_len: int | torch.Tensor) -> torch.Tensor:
    """(B, 1, T, P+T) bool: a past key j is visible when j < the row's first new position, a new key when causal.

    Rows may have different cached lengths: the past is padded to the longest one, and the padding
    (positions at or beyond the row's own length) is masked out.
    """
    B, T = pos.shape
    start = pos[:, :1]  # (B, 1) cached length of each row
    past = torch.arange(past_len, device=pos.device)[None, None, :] < start[:, :, None]  # (B, 1, P)
    past = past.expand(B, T, past.shape[-1])  # (B, T, P)
    new = pos[:, None, :] <= pos[:, :, None]  # (B, T, T) key t' visible from query t
    return torch.cat([past, new], dim=2)[:, None]  # (B, 1, T, P+T)


class Embed(nn.Module):
    """idx (B, T), pos (B, T) -> x (B, T, C)."""

    def __init__(self, model: LoopGPT):
        super().__init__()
        self.wte, self.wpe = model.transformer.wte, model.transformer.wpe

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(pos)


class Head(nn.Module):
    """x (B, T, C) -> logits (B, T, V)."""

    def __init__(self, model: LoopGPT):
        super().__init__()
        self.ln_f, self.lm_head = model.transformer.ln_f, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class LoopBody(nn.Module):
    """One outer loop n: Stack(x) over every layer and inner loop, then the gated loop-residual update.

    past_k/past_v are the loop's S = n_layer * inner_loops slots, (S, B, H, P, D); present_k/present_v
    are the new tokens' K/V for the same slots, (S, B, H, T, D). The gate is looked up from `loop`
    (a 0-d int64), clamped to the last trained gate exactly as `LoopGPT.gate` does.
    """

    def __init__(self, model: LoopGPT):
        super().__init__()
        cfg = model.config
        self.blocks = model.transformer.h
        self.inner, self.n_head = cfg.inner_loops, cfg.n_head
        self.max_loops = cfg.max_loops
        self.gated = model.loop_gates is not None
        if self.gated:
            # Row 0 (a_0 = 1) is never used: loop 0 takes Stack(x) whole, like LoopGPT.forward.
            self.register_buffer("ones", torch.ones(1, cfg.n_embd, dtype=model.loop_gates.dtype), persistent=False)
            self.loop_gates = model.loop_gates

    def attend(self, block, x, mask, past_k, past_v):
        B, T, C = x.shape
        D = C // self.n_head
        q, k, v = block.attn.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, D).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2), attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return block.attn.c_proj(y), k, v

    def forward(self, x, pos, loop, past_k, past_v):
        mask = attention_mask(pos, past_k.shape[3])
        s, ks, vs = x, [], []
        for i, block in enumerate(self.blocks):
            for j in range(self.inner):
                slot = i * self.inner + j
                y, k, v = self.attend(block, block.ln_1(s), mask, past_k[slot], past_v[slot])
                s = s + y
                s = s + block.mlp(block.ln_2(s))
                ks.append(k)
                vs.append(v)
        if self.gated:
            gates = torch.cat([self.ones, self.loop_gates], dim=0)  # (max_loops, C)
            # index_select, not gates[loop]: indexing with a 0-d tensor would make export read its value.
            a = gates.index_select(0, torch.clamp(loop, max=self.max_loops - 1).reshape(1))  # (1, C)
            s = torch.where(loop == 0, s, x + a * (s - x))
        return s, torch.stack(ks), torch.stack(vs)


class FullModel(nn.Module):
    """The whole model in one graph; the loop count N is the leading dimension of past_k/past_v.

    idx, pos (B, T); past_k/past_v (N, S, B, H, P, D) -> logits (B, T, V), present_k/present_v
    (N, S, B, H, T, D). Exported through `torch._higher_order_ops.scan`, so N is chosen at run time.
    """

    def __init__(self, model: LoopGPT):
        super().__init__()
        self.embed, self.body, self.head = Embed(model), LoopBody(model), Head(model)

    def forward(self, idx, pos, past_k, past_v):
        from torch._higher_order_ops.scan import scan

        x = self.embed(idx, pos)

        def step(carry, xs):
            h, n = carry
            h, k, v = self.body(h, pos, n, xs[0], xs[1])
            return (h, n + 1), (k, v)

        (x, _), (present_k, present_v) = scan(step, (x, torch.zeros((), dtype=torch.long)), (past_k, past_v))
        return self.head(x), present_k, present_v

"""The continuous-depth decode step: ONE outer loop for a batch whose rows stand at different loops.

The stack's weights are the same at every outer loop, so one application of the stack serves rows at
different loop indices of different tokens. Each running row carries (position, loop index n, hidden
state, cache row); a step embeds the rows at n = 0 (their token is already on the device), applies one
loop to every row (each writes and reads its own K/V slots for its own n and uses its own gate a_n),
and keeps the new hidden state. Rows that just finished their last loop then go through ln_f + head +
sampling (`head_step`), which writes their next token where the next step's embedding reads it.
A loops-1 request gets a token every step, a loops-6 one every sixth; nobody waits or is padded in depth.

Everything a step needs from the host (rows, positions, loop indices, sampling parameters) arrives as
tensors; nothing here reads the device back, so a step can be compiled and captured in a CUDA graph.

    python -m pytest tests/test_step.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adaptive import adaptive_hidden, convergence
from .forward import LoopModel, hidden
from .kv_cache import CacheAccess, KVCache, position_mask
from .sampling import DRAFT as DRAFT_STREAM
from .sampling import sample, token_stats, verify

OUT_FIELDS = ("token", "nll", "entropy", "finite", "prompt_nll", "accepted")  # columns of head_step's output
PLAIN, DRAFT, VERIFY = range(3)  # what a head row does (see head_step)
SERVING_MEASURE = "cosine"  # the convergence measure a step computes: no head needed (docs/results.md)
TOP_LOGPROBS = 5  # alternatives per token a client may ask for (OpenAI's limit for completions)
TOP_FIELDS = 2 * TOP_LOGPROBS  # with `top`, head_step's output gains the top log-probabilities, then their ids


@dataclass
class StepState:
    """Device buffers the decode step carries between steps.

    A *lane* holds one token in flight: its hidden state between loop iterations and the token it embeds at its
    loop 0. A plain request uses one lane; a self-speculative one keeps several tokens in flight (one lane each)
    at different loops of the same cache row."""

    hidden: torch.Tensor  # (L, C) each lane's residual stream between its loop iterations
    tokens: torch.Tensor  # (L,) long: the token each lane embeds at its next loop 0
    prompt_nll: torch.Tensor  # (R,) float32, per cache row: summed NLL of the prompt tokens scored so far
    draft_logits: torch.Tensor | None = None  # (L, V) float32: the distribution a lane's draft token came from
    banned: torch.Tensor | None = None  # (R, V) bool, per cache row: tokens a head row with `ban` may not sample

    @classmethod
    def allocate(cls, lanes: int, rows: int, n_embd: int, device, dtype: torch.dtype,
                 vocab: int = 0, ban_vocab: int = 0) -> StepState:
        """`vocab` > 0 also allocates the draft distributions that self-speculative sampling verifies against;
        `ban_vocab` > 0 the per-row banned tokens (`min_tokens`: no EOS or stop token before that many)."""
        return cls(torch.zeros(lanes, n_embd, device=device, dtype=dtype),
                   torch.zeros(lanes, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.float32, device=device),
                   torch.zeros(lanes, vocab, dtype=torch.float32, device=device) if vocab else None,
                   torch.zeros(rows, ban_vocab, dtype=torch.bool, device=device) if ban_vocab else None)


def decode_step(model: LoopModel, cache: KVCache, state: StepState, lanes: torch.Tensor, rows: torch.Tensor,
                pos: torch.Tensor, loop: torch.Tensor | int, ctx: int, span: slice | None = None,
                converge: bool = True) -> torch.Tensor | None:
    """One loop for each batch entry: its lane, cache row, position and loop index, all (B,) long; the new hidden
    states go to the lanes. Returns each entry's convergence value (B,) float32, the cosine change of its state
    over this loop (model/adaptive.py), on which adaptive requests stop. Several entries may share a cache row
    (at different positions).

    `ctx` (keys read per row) must exceed every position. Padded entries point at a scratch lane and row.
    `loop` may be one int when every entry stands at the same loop (a CPU fast path: one slot, one gate,
    no select between a new token's embedding and a hidden state); graphs and compile always pass a tensor.
    `span`: `rows` as a slice, when the host knows them to run up by one (each row once): keys are then read as a
    view of the cache instead of gathered row by row (a copy of every key, at batch 1 an eighth of a step).
    `converge` False: no convergence values (None), when no entry stops on them (eager only: a graph keeps one
    shape of work whatever the batch asks)."""
    if isinstance(loop, int):
        x = model.embed(state.tokens[lanes][:, None], pos[:, None]) if loop == 0 else state.hidden[lanes][:, None]
    else:
        x0 = model.embed(state.tokens[lanes][:, None], pos[:, None])  # (B, 1, C) a new token's loop-0 input
        x = torch.where((loop == 0)[:, None, None], x0, state.hidden[lanes][:, None])  # (B, 1, C)
    pos2 = pos[:, None]  # (B, 1)
    access = CacheAccess(cache, loop, rows if span is None else span, rows, pos2, ctx, position_mask(pos2, ctx))
    before = x[:, 0]
    x = model.loop_body(x, loop, access)[:, 0]  # (B, C)
    state.hidden.index_copy_(0, lanes, x)
    return convergence(model, before, x, SERVING_MEASURE) if converge else None


def head_step(model: LoopModel, state: StepState, src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor,
              temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
              counter: torch.Tensor, mode: torch.Tensor | None = None, random: bool = True,
              filtered: bool = True, ban: torch.Tensor | None = None, top: bool = False,
              entropy: bool = True) -> torch.Tensor:
    """ln_f + head + sampling for the hidden states of lanes `src` (Bh,); the token goes to lanes `dst`.

    `mode` (Bh,) per row (None: all PLAIN): PLAIN samples the next token; DRAFT samples a draft from an early
    loop's state (noise stream DRAFT) and keeps its distribution in `dst`; VERIFY is a token's last loop
    with a draft already in flight in `dst`: speculative acceptance, the accepted or corrected token replaces
    the draft. Returns float32 (Bh, len(OUT_FIELDS)): the token, its NLL and the entropy under the untempered
    distribution, whether every logit was finite (a row whose logits are not fails alone), the prompt NLL sum
    of cache row `rows` (read when its prefill completes), and whether a VERIFY row accepted its draft.

    `ban` (Bh,) bool: those rows may not sample their cache row's `state.banned` tokens (min_tokens). With `top`,
    TOP_FIELDS more columns: the TOP_LOGPROBS largest log-probabilities and their ids. NLL, entropy and the top
    are the model's own untempered distribution, before any ban (what OpenAI's logprobs report). Without
    `entropy` the entropy column is NaN (the metric is then sampled: see token_stats)."""
    logits = model.head(state.hidden[src][:, None])[:, 0].float()  # (Bh, V)
    finite = torch.isfinite(logits).all(dim=-1)
    logits = torch.where(finite[:, None], logits, 0.0)  # a broken row must not poison its batch mates' math
    raw = logits
    if ban is not None:
        logits = logits.masked_fill(state.banned[rows] & ban[:, None], float("-inf"))
    tokens = sample(logits, temperature, top_k, top_p, seed, counter, random, filtered)
    accepted = torch.zeros_like(finite)
    if mode is not None:
        drafts = sample(logits, temperature, top_k, top_p, seed, counter, random, filtered, DRAFT_STREAM)
        kept = state.tokens[dst]
        checked, accepted = verify(logits, state.draft_logits[dst], kept, temperature, top_k, top_p, seed, counter,
                                   random, filtered)
        tokens = torch.where(mode == PLAIN, tokens, torch.where(mode == DRAFT, drafts, checked))
        accepted = accepted & (mode == VERIFY)
        state.draft_logits.index_copy_(0, dst, torch.where((mode == DRAFT)[:, None], logits, state.draft_logits[dst]))
    nll, ent = token_stats(raw, tokens, entropy)
    state.tokens.index_copy_(0, dst, tokens)
    prompt_nll = state.prompt_nll[rows]
    out = torch.stack([tokens.float(), nll, ent, finite.float(), prompt_nll, accepted.float()], dim=-1)
    if not top:
        return out
    values, ids = torch.log_softmax(raw, dim=-1).topk(TOP_LOGPROBS, dim=-1)  # (Bh, k) each
    return torch.cat([out, values, ids.float()], dim=-1)  # ids < 2**24: exact in float32


def prefill(model: LoopModel, cache: KVCache, state: StepState, rows: list[int], chunks: list[list[int]],
            starts: list[int], loops: list[int], scratch: int, targets: list[list[int]] | None = None,
            adaptive: tuple[float, int] | None = None, scores: list[torch.Tensor] | None = None,
            states: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Append prompt chunks (several prompts in one padded forward, each at its own depth) to their cache
    rows; returns each chunk's last hidden state (P, C).

    Padding tokens write their K/V into the `scratch` row. With `targets` (the prompt token each position
    predicts, one list per chunk, possibly one shorter than the chunk), the teacher-forced NLL of those
    targets at the request's depth is added to `state.prompt_nll` (reset at a prompt's first chunk). With
    `scores` (a list) too, the per-position table (S, T', 1 + TOP_FIELDS) float32 is appended to it, one row per
    chunk with targets (S of them, in order; T' their longest): each target's
    log-probability, then the TOP_LOGPROBS largest log-probabilities and their ids (echo's prompt logprobs). With
    `adaptive` (tolerance, min_loops), every prompt token stops looping on its own (`adaptive_hidden`, the same
    policy the decode step follows), within the budget max(loops). With `states` (a list), every position's hidden
    state after its last loop (P, T, C) is appended to it (what a prefix cache keeps to run deeper loops later)."""
    dev = state.prompt_nll.device
    P, T = len(chunks), max(len(c) for c in chunks)
    limit = cache.max_len - 1
    idx = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=dev)  # (P, T)
    pos = torch.tensor([[min(s + t, limit) for t in range(T)] for s in starts], device=dev)  # (P, T)
    write = torch.tensor([[r if t < len(c) else scratch for t in range(T)] for r, c in zip(rows, chunks, strict=True)],
                         device=dev)  # (P, T)
    row_t = torch.tensor(rows, device=dev)
    ctx = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
    if adaptive is None:
        x = hidden(model, idx, loops, cache, row_t, pos, write, ctx)  # (P, T, C)
    else:
        x = adaptive_hidden(model, idx, adaptive[0], max(loops), adaptive[1], SERVING_MEASURE, cache, row_t, pos,
                            write, scratch)[0]
    if states is not None:
        states.append(x)
    last = x[torch.arange(P, device=dev), torch.tensor([len(c) - 1 for c in chunks], device=dev)]  # (P, C)
    fresh = [r for r, s in zip(rows, starts, strict=True) if s == 0]
    if fresh:
        state.prompt_nll[torch.tensor(fresh, device=dev)] = 0.0
    scored = [i for i, t in enumerate(targets or ()) if t]
    if scored:  # only the chunks with targets: the head over a batched neighbour's positions would be thrown away
        sel = torch.tensor(scored, device=dev)
        score_states(model, state, x[sel, :max(len(targets[i]) for i in scored)], [targets[i] for i in scored],
                     row_t[sel], scores)
    return last


def score_states(model: LoopModel, state: StepState, x: torch.Tensor, targets: list[list[int]], rows: torch.Tensor,
                 scores: list[torch.Tensor] | None = None) -> None:
    """Score prompt positions from their last loop's hidden states x (P, T, C) against `targets` (one list per row,
    at most T each): their NLL is added to `state.prompt_nll` of cache rows `rows` (P,), and with `scores` the
    per-position table is appended to it (see `prefill`, which scores its chunks with this; a prefix cache scores
    its cached positions from their kept states with it too)."""
    # Scoring the prompt needs the head at every position: the largest matmul of a prefill, so only on request.
    T = x.shape[1]
    tgt = torch.tensor([t + [-1] * (T - len(t)) for t in targets], device=x.device)  # (P, T); -1 is ignored
    logits = model.head(x).float()  # (P, T, V)
    if scores is None:
        nll = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-1, reduction="none")  # (P, T)
    else:  # one log-softmax serves the sum and the per-position table
        logp = torch.log_softmax(logits, dim=-1)  # (P, T, V)
        picked = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (P, T)
        nll = torch.where(tgt >= 0, -picked, 0.0)
        values, ids = logp.topk(TOP_LOGPROBS, dim=-1)  # (P, T, k) each
        scores.append(torch.cat([picked[..., None], values, ids.float()], dim=-1))  # (P, T, 1 + 2k)
    state.prompt_nll.index_add_(0, rows, nll.sum(dim=1))

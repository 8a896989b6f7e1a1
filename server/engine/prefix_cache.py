"""PrefixCache: prompt prefixes computed once, served at any depth (a deeper one runs only the loops they lack).

A prompt is cut into blocks of BLOCK tokens, each keyed by a hash chain (its parent block's key and its own ids, as
vLLM does), so a block's key names the whole prefix up to its end. An entry holds the block's K/V of every loop slot
its prefix was prefilled at: the K/V of loop n of a token depend only on loops <= n of it and the tokens before it,
so a block computed at depth D holds exactly what a request at any depth L <= D needs (its first L loops' slots).
An entry also keeps its tokens' hidden states after loop D - 1: a request deeper than D runs only loops D .. L - 1
of those tokens from them (as one more forward of the prefix, at admission), and its deeper blocks then replace the
shallower ones.

Entries are copied out of a row's KV cache when its prompt's prefill completes and copied into a new row at
admission (docs/architecture.md says why a copy and not a paged pool); memory is bounded (`capacity` bytes),
least recently used first out. The host-side index (`match`) is what the scheduler asks; `load` and `store` are
device copies the runner makes.

Never used where the numbers would differ: with a KV budget (the shared slots hold depth-specific K/V: the engine
builds no cache), nor for adaptive requests (their tokens stop at their own loops). A prompt whose logprobs are
asked for (echo) uses only blocks computed at its depth or shallower: its cached positions are scored from their
states after its last loop. (The sampled prompt_nll metric scores only the positions a request computes.)

    python -m pytest tests/test_prefix_cache.py -q
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from loopgpt.model import KVCache
from loopgpt.model.kv_cache import CacheAccess, position_mask

BLOCK = 16  # prompt tokens per block
ROOT = 0  # the parent key of a prompt's first block


@dataclass
class Block:
    key: int
    parent: int
    ids: tuple[int, ...]
    depth: int  # loops the prefix was computed at: K/V of loops < depth are here
    k: torch.Tensor  # (slots(depth), H, BLOCK, D)
    v: torch.Tensor
    h: torch.Tensor  # (BLOCK, C) each token's hidden state after loop depth - 1

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.h.nbytes


def chain(ids: list[int]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(key, parent key, ids) of each full block of `ids`, first to last."""
    out, parent = [], ROOT
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        block = tuple(ids[start:start + BLOCK])
        key = hash((parent, block))  # ints and tuples of ints hash the same in every process
        out.append((key, parent, block))
        parent = key
    return out


class PrefixCache:
    def __init__(self, cache: KVCache, capacity: int):
        self.cache = cache
        self.capacity = capacity  # bytes
        self.used = 0
        self.blocks: collections.OrderedDict[int, Block] = collections.OrderedDict()  # least recently used first
        self.per_loop = cache.config.n_layer * cache.config.inner_loops  # slots of one loop: loop n's are contiguous
        k = cache.k
        # Each row's prompt states after its last loop, kept from its prefill until its blocks are stored
        self.states = torch.zeros(cache.batch_size, cache.max_len, cache.config.n_embd, device=k.device,
                                  dtype=k.dtype)
        # Per row, the blocks it loaded from entries computed deeper than it: their states are not the row's
        self.foreign: dict[int, set[int]] = {}

    def block_bytes(self, depth: int) -> int:
        k = self.cache.k
        return (2 * depth * self.per_loop * k.shape[2] * k.shape[4] + self.states.shape[2]) * BLOCK * k.element_size()

    def keep(self, row: int, start: int, states: torch.Tensor) -> None:
        """A prefill chunk's hidden states (T, C) after its last loop, at positions start.. of `row`."""
        if start == 0:  # a prompt prefilled from its start: nothing loaded
            self.foreign.pop(row, None)
        self.states[row, start:start + len(states)] = states

    def match(self, ids: list[int], loops: int, scored: bool = False) -> list[Block]:
        """The longest run of cached blocks starting `ids`, leaving at least the last prompt token to prefill (its
        hidden state samples the first token); marked as just used. Blocks computed shallower than `loops` must
        share one depth (their deeper loops run together from their kept states, see `load`). For a `scored` prompt
        (echo) no block computed deeper either: its positions are scored from their states after loop `loops` - 1."""
        out: list[Block] = []
        shallow = None
        for key, parent, block in chain(ids[:len(ids) - 1]):
            entry = self.blocks.get(key)
            if entry is None or entry.parent != parent or entry.ids != block or scored and entry.depth > loops:
                break
            if entry.depth < loops:
                if shallow not in (None, entry.depth):
                    break
                shallow = entry.depth
            out.append(entry)
        for entry in reversed(out):  # the first block ends up the most recent: leaves are evicted before roots
            self.blocks.move_to_end(entry.key)
        return out

    def load(self, model, row: int, blocks: list[Block], loops: int) -> None:
        """Positions 0.. of cache row `row` get the K/V of loops < `loops` of `blocks` (on the device). Blocks
        computed shallower (at one depth D) get theirs for loops < D, then run loops D .. loops - 1 from their kept
        states in one forward (each position reads its row's keys of that loop, as a prefill does). The row's
        `states` then hold every position's state after loop `loops` - 1, but for blocks computed deeper."""
        deep, self.foreign[row] = [], {i for i, b in enumerate(blocks) if b.depth > loops}
        for i, b in enumerate(blocks):
            slots, span = min(b.depth, loops) * self.per_loop, slice(i * BLOCK, (i + 1) * BLOCK)
            self.cache.k[:slots, row, :, span] = b.k[:slots]
            self.cache.v[:slots, row, :, span] = b.v[:slots]
            if b.depth < loops:
                deep.append(i)
            elif b.depth == loops:
                self.states[row, span] = b.h
        if not deep:
            return
        dev = self.states.device
        pos = torch.tensor([[i * BLOCK + t for i in deep for t in range(BLOCK)]], device=dev)  # (1, T)
        x = torch.cat([blocks[i].h for i in deep])[None]  # (1, T, C)
        rows, ctx = torch.tensor([row], device=dev), (deep[-1] + 1) * BLOCK
        for n in range(blocks[deep[0]].depth, loops):
            x = model.loop_body(x, n, CacheAccess(self.cache, n, rows, rows, pos, ctx, position_mask(pos, ctx)))
        self.states[row, pos[0]] = x[0]  # what the row's deeper blocks keep when they are stored

    def store(self, row: int, ids: list[int], loops: int) -> None:
        """Keep the full blocks of the prompt `ids` just prefilled at `loops` in cache row `row`: those not cached
        yet, or cached shallower (replaced). Evicts the least recently used blocks of other prompts to stay within
        capacity; where that is not enough, the rest of this prompt is not kept (a block without its parent could
        never be matched), nor from a block the row loaded from a deeper entry that was evicted since (the row does
        not hold its states)."""
        size = self.block_bytes(loops)
        slots = loops * self.per_loop
        blocks = chain(ids)
        foreign = self.foreign.pop(row, set())
        mine = {key for key, _, _ in blocks}
        for i, (key, parent, block) in enumerate(blocks):
            old = self.blocks.get(key)
            if old is not None and old.parent == parent and old.ids == block and old.depth >= loops:
                continue
            if i in foreign:
                return
            if old is not None:
                self._drop(key)
            while self.used + size > self.capacity:
                victim = next((k for k in self.blocks if k not in mine), None)
                if victim is None:
                    return
                self._drop(victim)
            span = slice(i * BLOCK, (i + 1) * BLOCK)
            k = self.cache.k[:slots, row, :, span].clone()
            v = self.cache.v[:slots, row, :, span].clone()
            self.blocks[key] = Block(key, parent, block, loops, k, v, self.states[row, span].clone())
            self.used += size
        for key, _, _ in reversed(blocks):  # as `match` leaves them: the first block the most recent
            self.blocks.move_to_end(key)

    def _drop(self, key: int) -> None:
        self.used -= self.blocks.pop(key).nbytes

    def usage(self) -> float:
        """Fraction of the capacity in use, for the prefix_cache_usage_ratio gauge."""
        return self.used / self.capacity if self.capacity else 0.0

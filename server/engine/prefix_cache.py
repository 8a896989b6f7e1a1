"""PrefixCache: prompt prefixes computed once, served at any depth up to the one they were computed at.

A prompt is cut into blocks of BLOCK tokens, each keyed by a hash chain (its parent block's key and its own ids, as
vLLM does), so a block's key names the whole prefix up to its end. An entry holds the block's K/V of every loop slot
its prefix was prefilled at: the K/V of loop n of a token depend only on loops <= n of it and the tokens before it,
so a block computed at depth D holds exactly what a request at any depth L <= D needs (its first L loops' slots).
A request deeper than every entry of its prefix recomputes the prompt, and the deeper blocks replace the shallower.

Entries are copied out of a row's KV cache when its prompt's prefill completes and copied into a new row at
admission (docs/architecture.md says why a copy and not a paged pool); memory is bounded (`capacity` bytes),
least recently used first out. The host-side index (`match`) is what the scheduler asks; `load` and `store` are
device copies the runner makes.

Never used where the numbers would differ: with a KV budget (the shared slots hold depth-specific K/V: the engine
builds no cache), for adaptive requests (their tokens stop at their own loops), nor for scored prompts (their
prefill must see every position); the scheduler decides the last two.

    python -m pytest tests/test_prefix_cache.py -q
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from loopgpt.model import KVCache

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

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


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

    def block_bytes(self, depth: int) -> int:
        k = self.cache.k
        return 2 * depth * self.per_loop * k.shape[2] * BLOCK * k.shape[4] * k.element_size()

    def match(self, ids: list[int], loops: int) -> list[Block]:
        """The longest run of cached blocks starting `ids` computed at `loops` or deeper, leaving at least the last
        prompt token to prefill (its hidden state samples the first token); marked as just used."""
        out: list[Block] = []
        for key, parent, block in chain(ids[:len(ids) - 1]):
            entry = self.blocks.get(key)
            if entry is None or entry.parent != parent or entry.ids != block or entry.depth < loops:
                break
            out.append(entry)
        for entry in reversed(out):  # the first block ends up the most recent: leaves are evicted before roots
            self.blocks.move_to_end(entry.key)
        return out

    def load(self, row: int, blocks: list[Block], loops: int) -> None:
        """Copy the K/V of loops < `loops` of `blocks` into positions 0.. of cache row `row` (on the device)."""
        slots = loops * self.per_loop
        length = len(blocks) * BLOCK
        self.cache.k[:slots, row, :, :length] = torch.cat([b.k[:slots] for b in blocks], dim=2)
        self.cache.v[:slots, row, :, :length] = torch.cat([b.v[:slots] for b in blocks], dim=2)

    def store(self, row: int, ids: list[int], loops: int) -> None:
        """Keep the full blocks of the prompt `ids` just prefilled at `loops` in cache row `row`: those not cached
        yet, or cached shallower (replaced). Evicts the least recently used blocks of other prompts to stay within
        capacity; where that is not enough, the rest of this prompt is not kept (a block without its parent could
        never be matched)."""
        size = self.block_bytes(loops)
        slots = loops * self.per_loop
        blocks = chain(ids)
        mine = {key for key, _, _ in blocks}
        for i, (key, parent, block) in enumerate(blocks):
            old = self.blocks.get(key)
            if old is not None and old.parent == parent and old.ids == block and old.depth >= loops:
                continue
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
            self.blocks[key] = Block(key, parent, block, loops, k, v)
            self.used += size
        for key, _, _ in reversed(blocks):  # as `match` leaves them: the first block the most recent
            self.blocks.move_to_end(key)

    def _drop(self, key: int) -> None:
        self.used -= self.blocks.pop(key).nbytes

    def usage(self) -> float:
        """Fraction of the capacity in use, for the prefix_cache_usage_ratio gauge."""
        return self.used / self.capacity if self.capacity else 0.0

"""The memory budget: sizes computed from a config equal what torch allocates, and what cannot fit is refused
in one sentence that names the size and what shrinks it.

    python -m pytest tests/test_memory.py -q
"""

from __future__ import annotations

import pytest
import torch
from loopgpt.model import KVCache, LoopGPT, preset
from loopgpt.model.memory import MemoryBudgetError, check_memory, free_bytes, human_bytes

VARIANTS = [("tiny", {}), ("tiny", {"bias": False, "gate": "none"}), ("tiny", {"inner_loops": 2, "kv_budget": 3}),
            ("tiny", {"max_loops": 1}), ("demo", {})]


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_num_params_counts_what_the_model_allocates(name, overrides):
    cfg = preset(name, **overrides)
    assert cfg.num_params() == sum(p.numel() for p in LoopGPT(cfg).parameters())  # tied head counted once


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_kv_cache_bytes_is_what_the_cache_allocates(name, overrides):
    cfg = preset(name, **overrides)
    for batch, max_len, loops, dtype in ((3, None, None, torch.float32), (2, 17, cfg.loop_cap - 1, torch.bfloat16)):
        cache = KVCache(cfg, batch, max_len=max_len, loops=loops, dtype=dtype)
        nbytes = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
        assert cfg.kv_cache_bytes(batch, max_len, loops, dtype_bytes=dtype.itemsize) == nbytes


def test_free_memory_is_known_on_linux():
    free = free_bytes("cpu")
    assert free is not None and 0 < free < 1 << 50


def test_a_kv_cache_that_cannot_fit_is_refused_naming_its_size_and_the_flags():
    cfg = preset("demo", loop_cap=1_000_000)  # the damaged checkpoint: 6.3 TB of K/V at 8 rows
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(cfg, "cpu", batch=8, shrink="--max-batch, --loop-cap or --max-context")
    message = str(info.value)
    assert message.startswith("the KV cache needs 6.3 TB (8 row(s) x 1000000 loops x 256 positions) but only ")
    assert message.endswith("of RAM is free; lower --max-batch, --loop-cap or --max-context")
    assert "\n" not in message
    # The demo as shipped fits, and the call says how much it needs.
    assert check_memory(preset("demo"), "cpu", weights=True, batch=8) == \
        preset("demo").num_params() * 4 + preset("demo").kv_cache_bytes(8)


def test_weights_that_cannot_fit_are_refused_before_anything_is_allocated():
    cfg = preset("demo", n_embd=1_200_000)
    with pytest.raises(MemoryBudgetError, match=r"^the weights need \d+\.\d TB \([\d,]+ parameters\) but only "):
        check_memory(cfg, "cpu", weights=True)


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 1000, 3_100_000_000_000, 5e15)] == ["999 B", "1.0 KB", "3.1 TB", "5000.0 TB"]


def test_the_prefix_cache_counts_in_the_budget():
    """The server's prefix cache is checked at its capacity with the KV cache (`loopgpt serve --prefix-cache-mb`)."""
    cfg = preset("demo")
    kv = cfg.kv_cache_bytes(8)
    assert check_memory(cfg, "cpu", batch=8, prefix_bytes=1 << 20) == kv + (1 << 20)
    with pytest.raises(MemoryBudgetError) as info:
        check_memory(cfg, "cpu", batch=8, prefix_bytes=1 << 50, shrink="--max-batch or --prefix-cache-mb")
    assert " and the prefix cache may take 1125.9 TB (--prefix-cache-mb) but only " in str(info.value)

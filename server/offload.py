"""Work that needs no event loop runs in a few threads instead: rendering a chat template, tokenizing a prompt,
detokenizing and serializing a long list of ids. One 1 MB prompt is ~0.1 s of BPE and ~0.05 s of JSON for its
250,000 ids; on the event loop, eight of them at once held /health and every running stream for a second
(issue 25). tiktoken releases the GIL while it encodes, so these threads run beside the loop, not in turns.

At most OFFLOAD_THREADS calls run at once (cores - 1, at most 4); more wait their turn on the event loop, where
waiting costs nothing.
On Linux the threads run at a lower CPU priority (nice OFFLOAD_NICE): on a machine whose cores are all busy the
scheduler then wakes the event loop and the engine first, so /health and running streams do not queue behind BPE.

    python scripts/health_under_load.py --url http://127.0.0.1:8123      # /health p99 under 8 x 1 MB /tokenize
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2


# cores - 1, at most 4: a core stays free for the event loop. Measured on 2 busy cores under 8 x 1 MB /tokenize
# (scripts/health_under_load.py, 25 s each): /health p99 36-48 ms with 1 thread, 52-74 ms with 2, 150-160 with 4,
# at the same tokenize throughput (the cores were the limit).
OFFLOAD_THREADS = max(1, min(4, _cores() - 1))
OFFLOAD_NICE = 10
T = TypeVar("T")


def _lower_priority() -> None:
    if sys.platform == "linux":  # a thread id names one thread only on Linux (elsewhere it would be the process)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), OFFLOAD_NICE)


class Offload:
    """`await offload(fn, *args)`: fn(*args) in one of `threads` threads; its exception is the caller's."""

    def __init__(self, threads: int = OFFLOAD_THREADS):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="loopgpt-offload", initializer=_lower_priority)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

"""Memory budget: refuse, in one sentence, to build weights or a KV cache that cannot fit in free memory.

A KV cache is preallocated whole (every slot of every row), so an absurd `loop_cap` or `--max-batch` would
otherwise end in a hang, an allocator traceback or the OOM killer long after the command was typed.

    python -c "from loopgpt.model import preset; from loopgpt.model.memory import *; \\
print(human_bytes(preset('gpt2-81m-loop').kv_cache_bytes(8)), human_bytes(free_bytes('cpu') or 0))"
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import LoopGPTConfig


class MemoryBudgetError(ValueError):
    """What was asked for cannot fit in the free memory of the device; the message says what shrinks it."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup memory limit (a container's), or None without a limit.

    /proc/meminfo shows the host's memory inside a container; the container is killed at its own limit."""
    pairs = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
             ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))  # v1
    for limit_path, usage_path in pairs:
        try:
            limit = Path(limit_path).read_text().strip()
            usage = int(Path(usage_path).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's huge number, means no limit
            return max(0, int(limit) - usage)
    return None


def free_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory of `device` in bytes: CUDA's own count on a GPU, else available RAM (the tighter of the
    host's and the container's); None where it cannot be known (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    known = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(known) if known else None


def check_memory(config: LoopGPTConfig, device: torch.device | str = "cpu", *, weights: bool = False,
                 batch: int = 0, max_len: int | None = None, loops: int | None = None, dtype_bytes: int = 4,
                 shrink: str = "", prefix_bytes: int = 0) -> int:
    """Bytes needed for the weights (with `weights`), a KV cache of `batch` rows (see
    `LoopGPTConfig.kv_cache_bytes`) and a prefix cache of `prefix_bytes` (the server's, at its capacity); raises
    MemoryBudgetError when they exceed the device's free memory.

    Call it before allocating. `shrink` names what the user can lower (flags), for the sentence."""
    assert batch >= 0 and dtype_bytes > 0 and prefix_bytes >= 0
    weight_bytes = config.num_params() * dtype_bytes if weights else 0
    kv_bytes = config.kv_cache_bytes(batch, max_len, loops, dtype_bytes) if batch else 0
    need = weight_bytes + kv_bytes + prefix_bytes
    free = free_bytes(device)
    if free is None or need <= free:
        return need
    where = "GPU memory" if torch.device(device).type == "cuda" else "RAM"
    parts = []
    if weight_bytes:
        parts.append(f"the weights need {human_bytes(weight_bytes)} ({config.num_params():,} parameters)")
    if kv_bytes:
        parts.append(f"the KV cache needs {human_bytes(kv_bytes)} ({batch} row(s) x {loops or config.loop_cap} "
                     f"loops x {max_len or config.block_size} positions)")
    if prefix_bytes:
        parts.append(f"the prefix cache may take {human_bytes(prefix_bytes)} (--prefix-cache-mb)")
    fix = f"; lower {shrink}" if shrink else ""
    raise MemoryBudgetError(f"{' and '.join(parts)} but only {human_bytes(free)} of {where} is free{fix}")

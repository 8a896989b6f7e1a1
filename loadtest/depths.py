"""The mixed-depth load every comparison uses (`loopgpt bench` rows 2 and 6, `loopgpt loadtest --mixed`): requests
at loops {1, 2, 4, 6} against every request at the deepest, and the gain theory allows.

A module of its own so that the CPU rows, the CUDA row and the load generator share one definition without
importing each other.

    python -c "from loopgpt.loadtest.depths import MIXED_LOOPS, depth_gain; print(depth_gain(MIXED_LOOPS))"
"""

from __future__ import annotations

from collections.abc import Sequence

MIXED_LOOPS = (1, 2, 4, 6)


def depth_gain(mix: Sequence[int]) -> float:
    """The theoretical gain of a mixed-depth load over running it all at its deepest: max / mean loops (with equal
    tokens per request the work per token is its loops)."""
    return max(mix) / (sum(mix) / len(mix))


def mixed_loops(loop_cap: int) -> list[int]:
    """MIXED_LOOPS as a checkpoint can serve them (each cut to its loop cap)."""
    return [min(k, loop_cap) for k in MIXED_LOOPS]

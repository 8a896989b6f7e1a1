"""The draft-then-verify cost model (loadtest/spec_cost.py): its arithmetic, and its timings on a real checkpoint.

    python -m pytest tests/test_spec_cost.py -q
"""

from __future__ import annotations

import pytest
from loopgpt.loadtest.spec_cost import main, measure, price


def test_price_is_the_documented_formula():
    """Unit costs, free heads, every draft accepted: a round of m drafts at k=1 costs (m+1) + (N-1) steps for m+1
    tokens, against N per token plain."""
    n = 6
    m = {"loops": n, "step": 1.0, "loop": dict.fromkeys(range(1, 7), 1.0), "head": dict.fromkeys(range(1, 7), 0.0)}
    rows = {(r["k"], r["m"]): r for r in price(m, [1.0])}
    for d in range(1, 6):
        assert rows[1, d]["ratio"] == pytest.approx(n * (d + 1) / ((d + 1) + (n - 1)))
    half = {(r["k"], r["m"]): r for r in price(m, [0.5])}[2, 1]
    assert half["tokens_per_round"] == pytest.approx(1.5)  # 1 + 0.5: the bonus token, the draft half the time
    assert half["ratio"] == pytest.approx(n / ((2 * 2 + 4) / 1.5))


def test_measure_and_main_run_on_a_checkpoint(tiny_checkpoint, capsys):
    m = measure(str(tiny_checkpoint), reps=10)
    assert m["step"] > 0 and all(v > 0 for v in (*m["loop"].values(), *m["head"].values()))
    main(["--checkpoint", str(tiny_checkpoint), "--reps", "10", "--accept", "0.5,0.9"])
    out = capsys.readouterr().out
    assert "plain lockstep" in out and out.count("x plain") == len(price(m, [0.5, 0.9])) + 1

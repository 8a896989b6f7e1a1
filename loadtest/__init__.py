"""loopgpt.loadtest: the load generator (`loopgpt loadtest`) and the ratio benchmarks (`loopgpt bench`).

stats.py (records, percentiles, per-loops summary), client.py (one timed SSE request), runner.py
(closed/open loop), report.py (table, JSON, PNG), sweep.py (`--sweep` / `--mixed`: one closed loop per level,
markdown), probe.py (token-sized prompts and CPU seconds from the server), depths.py (the mixed-depth load),
bench*.py + hf.py + timing.py (`loopgpt bench`), bench_checkpoint.py (`loopgpt bench-checkpoint`).

    loopgpt loadtest --url http://127.0.0.1:8000 --concurrency 4 --requests 40 --loops 1,2,4,6
"""

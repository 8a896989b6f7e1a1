"""loopgpt.loadtest: the load generator (`loopgpt loadtest`) and the ratio benchmarks (`loopgpt bench`).

stats.py (records, percentiles, per-loops summary), client.py (one timed SSE request), runner.py
(closed/open loop), report.py (table, JSON, PNG), bench*.py + hf.py + timing.py (`loopgpt bench`).

    loopgpt loadtest --url http://127.0.0.1:8000 --concurrency 4 --requests 40 --loops 1,2,4,6
"""

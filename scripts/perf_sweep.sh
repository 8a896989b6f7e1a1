#!/usr/bin/env bash
# The speed tables of docs/performance.md, on the demo and on the GPT-2-vocabulary benchmark checkpoint
# (`loopgpt bench-checkpoint`, built into a temp dir): for each, `loopgpt serve --max-batch 32` on a free port, a
# closed-loop streaming sweep over concurrency (/v1/completions, prompts of 32-64 tokens, 64 greedy tokens each,
# ignore_eos), the mixed-depth comparison (16 streams, loops {1,2,4,6} vs all at 6); then `loopgpt bench` on both.
# Markdown tables go to stdout, progress to stderr. Run it on a quiet machine: the client shares its cores.
#   bash scripts/perf_sweep.sh > perf.md             (long on 2 cores: `loopgpt bench`'s rows take most of it)
#   SWEEP=1,2 ROUNDS=1 TOKENS=8 MIXED_STREAMS=2 BENCH_ROWS=1 BENCH_REPS=1 bash scripts/perf_sweep.sh   (smoke test)
# Knobs (environment): SWEEP (concurrency levels, default 1,4,16,32), LOOPS (the sweep's depth, 6), ROUNDS
# (requests per stream per level, 4), TOKENS (generated per request and per bench repetition, 64), PROMPT_TOKENS
# (32:64), MIXED_STREAMS (16; empty skips the mixed comparison), BENCH_ROWS (1,2,3,4,7,8,9; empty skips
# `loopgpt bench`), BENCH_REPS (3), THREADS (`serve --threads`, default 0: the server's own choice), DTYPE (auto),
# DEMO (checkpoints/demo), PYTHON (python), JSON_DIR (when set, every run's JSON is written there too).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SWEEP=${SWEEP:-1,4,16,32}
LOOPS=${LOOPS:-6}
ROUNDS=${ROUNDS:-4}
TOKENS=${TOKENS:-64}
PROMPT_TOKENS=${PROMPT_TOKENS:-32:64}
MIXED_STREAMS=${MIXED_STREAMS-16}
BENCH_ROWS=${BENCH_ROWS-1,2,3,4,7,8,9}
BENCH_REPS=${BENCH_REPS:-3}
THREADS=${THREADS:-0}
DTYPE=${DTYPE:-auto}
DEMO=${DEMO:-$ROOT/checkpoints/demo}
PYTHON=${PYTHON:-python}
loopgpt() { "$PYTHON" -m loopgpt.cli "$@"; }

TMP=$(mktemp -d -t loopgpt-perf-XXXXXX)
SERVER=""
stop_server() {  # SIGTERM drains; a server that has not exited after 30 s is killed
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill "$SERVER"
    for _ in $(seq 300); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  SERVER=""
}
trap 'stop_server; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_server() {  # checkpoint -> sets SERVER (pid) and URL, returns once /health answers 200
  local port
  port=$(free_port)
  URL="http://127.0.0.1:$port"
  # python itself in the background (not the shell function), so that $! is the server's pid
  "$PYTHON" -m loopgpt.cli serve --checkpoint "$1" --host 127.0.0.1 --port "$port" --max-batch 32 --max-queue 256 \
    --threads "$THREADS" --dtype "$DTYPE" --log-level warning >"$TMP/serve.log" 2>&1 &
  SERVER=$!
  "$PYTHON" - "$URL" "$SERVER" <<'EOF' || { cat "$TMP/serve.log" >&2; exit 1; }
import os, sys, time
import httpx
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("loopgpt serve exited before it was healthy; its log follows")
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(f"loopgpt serve at {url} was not healthy after 300 s; its log follows")
EOF
}

load() {  # loadtest flags common to the sweep and the mixed comparison
  loopgpt loadtest --url "$URL" --endpoint completions --rounds "$ROUNDS" --max-tokens "$TOKENS" --temperature 0 \
    --ignore-eos --prompt-tokens "$PROMPT_TOKENS" --quiet "$@"
}

echo "building the GPT-2-vocabulary benchmark checkpoint in $TMP/gpt2-vocab" >&2
loopgpt bench-checkpoint --out "$TMP/gpt2-vocab" >&2
echo "# loopgpt perf sweep, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load average $(cut -d' ' -f1 /proc/loadavg)"
for ckpt in "$DEMO" "$TMP/gpt2-vocab"; do
  name=$(basename "$ckpt")
  echo "starting loopgpt serve on $name" >&2
  start_server "$ckpt"
  echo
  echo "## $name: closed-loop sweep at loops $LOOPS (serve --max-batch 32 --threads $THREADS --dtype $DTYPE)"
  echo
  load --sweep "$SWEEP" --loops "$LOOPS" ${JSON_DIR:+--json "$JSON_DIR/sweep-$name.json"}
  if [ -n "$MIXED_STREAMS" ]; then
    echo
    echo "## $name: mixed depth, $MIXED_STREAMS streams"
    echo
    load --concurrency "$MIXED_STREAMS" --mixed ${JSON_DIR:+--json "$JSON_DIR/mixed-$name.json"}
  fi
  stop_server
done
if [ -n "$BENCH_ROWS" ]; then
  echo
  echo "## loopgpt bench --rows $BENCH_ROWS --reps $BENCH_REPS --tokens $TOKENS --dtype $DTYPE"
  echo
  echo '```'
  loopgpt bench --checkpoint "$DEMO" --checkpoint "$TMP/gpt2-vocab" --rows "$BENCH_ROWS" --reps "$BENCH_REPS" \
    --tokens "$TOKENS" --dtype "$DTYPE" ${JSON_DIR:+--json "$JSON_DIR/bench.json"}
  echo '```'
fi

#!/usr/bin/env bash
# Small-scale reproduction of the loop-residual papers' comparison on TinyStories (docs/results.md).
# One fixed token budget for every run; held-out loss on tinystories/heldout.txt (never trained on).
#   bash scripts/reproduce_papers.sh [OUT_DIR]      (CPU: about 15 minutes on 2 idle cores)
set -euo pipefail
OUT=${1:-runs/papers}
DATA=${DATA:-../shared/data/tinystories}
STEPS=${STEPS:-400}
mkdir -p "$OUT"
[ -f "$OUT/tok/meta.json" ] || loopgpt prepare --input "$DATA/train.txt" --val-input "$DATA/valid.txt" \
  --out "$OUT/tok" --tokenizer train:2048
common=(--data "$OUT/tok" --preset demo --n-embd 128 --n-head 4 --block-size 128 --batch-size 16
        --max-steps "$STEPS" --lr 2e-3 --min-lr 2e-4 --warmup-steps 30 --eval-interval 100 --eval-batches 8
        --device cpu --seed 1337)
run() {  # name, then model flags
  local name=$1; shift
  if [ ! -f "$OUT/$name/eval.json" ]; then
    local t0=$SECONDS
    loopgpt train "${common[@]}" --out "$OUT/$name" "$@"
    echo "{\"wall_s\": $((SECONDS - t0))}" > "$OUT/$name/wall.json"
    loopgpt eval --checkpoint "$OUT/$name" --data "$DATA/heldout.txt" --max-tokens 60000 --write-eval \
      --json "$OUT/$name/heldout.json"
  fi
}
run l1x1 --n-layer 1 --max-loops 1 --loops-sampling fixed
run l1x2 --n-layer 1 --max-loops 2 --loops-sampling fixed
run l2x1 --n-layer 2 --max-loops 1 --loops-sampling fixed
run l1x4-fixed --n-layer 1 --max-loops 4 --loops-sampling fixed
run l1x4-sampled --n-layer 1 --max-loops 4 --loops-sampling uniform
run l1x4-poisson --n-layer 1 --max-loops 4 --loops-sampling poisson-lognormal --loops-mean 4
run l1x4-maxheavy --n-layer 1 --max-loops 4 --loops-sampling max-heavy
python scripts/papers_table.py "$OUT"

#!/usr/bin/env bash
# The demo model's training run (docs/digits.md, "Training"), in the background: niced, one torch thread,
# log appended to $WORK/train.log, the python process id in $WORK/pid. Extra arguments go to the recipe,
# e.g. --resume to continue from $WORK's checkpoints (or from recipes/digits/checkpoints/ copied there).
#   recipes/digits/run_background.sh --resume
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-runs/digits13}
PY=${PY:-.venv/bin/python}
mkdir -p "$WORK"
PYTHONPATH=$PWD/src:$PWD OMP_NUM_THREADS=1 nohup nice -n 5 "$PY" -m recipes.digits.train \
  --init recipes/digits/checkpoints/demo_4x4 --work "$WORK" --out "$WORK/out" \
  --s1-steps 1200 --s1-lr 1e-3 --s2-steps 1200 --s2-warmup 100 --s2-ground 1.0 --s2-qk-lr 3e-3 --threads 1 "$@" \
  >> "$WORK/train.log" 2>&1 &
echo $! > "$WORK/pid"
echo "started $(cat "$WORK/pid"), log $WORK/train.log"

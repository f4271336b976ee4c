#!/bin/bash
# The compressor shipped next to the demo model (src/explainprune/assets/demo_compressor; issue 20,
# docs/compressor.md): labels of six board sizes / frame counts of the digits train split, then the default
# f_θ recipe on their union. Seeds 0 and 3-8 of the train split; the held-out benchmark uses the test split
# (seed 2020), the demo the test split (seed 0). Every step resumes when rerun.
#
#   bash recipes/demo_compressor/run.sh [OUT]        (default OUT=runs/demo_compressor)
#
# Measured on this 2-core machine (one thread per job, two jobs at a time): labels ~12 min in all, training
# ~70-90 s per epoch (2,677 labels); the shipped f_θ is the epoch the guard kept of 30.
set -euo pipefail
OUT=${1:-runs/demo_compressor}
EP=${EXPLAINPRUNE:-.venv/bin/explainprune}
export OMP_NUM_THREADS=1
label() { name=$1; shift; "$EP" label --model demo --task digits --split train --max-new-tokens 4 --no-progress \
    --out "$OUT/labels/$name" "$@"; }
label b4v4 --seed 0 --limit 960                                    # 4x4 boards (rowcol, colour) + 4-frame videos
label b8a --seed 3 --limit 128 --grid 8 --kinds rowcol colour      # 8x8 boards
label b8b --seed 4 --limit 320 --grid 8 --kinds rowcol colour
label b8c --seed 6 --limit 384 --grid 8 --kinds rowcol colour
label v16 --seed 5 --limit 384 --frames 16 --kinds video           # 16-frame videos (1,024 visual tokens)
label b6 --seed 7 --limit 384 --grid 6 --kinds rowcol colour       # 6x6 boards
label v8 --seed 8 --limit 256 --frames 8 --kinds video             # 8-frame videos
L="$OUT/labels"
"$EP" train --labels "$L/b4v4" "$L/b8a" "$L/b8b" "$L/b8c" "$L/v16" "$L/b6" "$L/v8" --out "$OUT/f" --epochs 30 \
    --threads 1 --resume

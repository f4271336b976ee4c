#!/usr/bin/env bash
# The GPU check: one command for the GPU machine as it is (its own python3 + torch, no package index).
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine (after `make gpu-bundle` here)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh      # the same script on CPU, tiny shapes (in make test)
#
# 1. installs the wheels of .gpu-bundle/ (`make gpu-bundle`) with pip --no-index --no-deps --target into a
#    temporary folder and puts src/ and that folder first on PYTHONPATH (no venv: the machine's own torch);
# 2. prints the versions it runs with and checks them against explainprune's requirements;
# 3. runs the CUDA tests (tests/gpu, 60 s per test where pytest-timeout is there);
# 4. runs benchmarks/real_scale.py --device cuda (bf16, random weights) at the Qwen2-VL-7B shape (1,296 and
#    5,776 visual tokens, label throughput on 4 samples), the 2B shape (1,296) and the 7B shape at 14,884
#    visual tokens (relevance time and memory);
# 5. ends with a summary table (tests, prefill speedups at 50/25/10%, scoring share, relevance seconds and
#    peak GiB, label throughput, the KV cache) and the targets of docs/devices.md, also when a step failed.
# Three files go to $OUT (the device tool's folder; at most 8 files come back) or ./gpu_check_out:
# gpu_check.log (every step's output), results.json (every number), summary.md (the table). Every step has
# its own time limit; on the GPU machine they add up to 7 minutes (420 s). Exit status: 0 when every step
# ran (the targets are reported, not enforced), 1 otherwise.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$ROOT/gpu_check_out}"
BUNDLE="${GPU_BUNDLE:-$ROOT/.gpu-bundle}"
mkdir -p "$OUTDIR"
if [ "$DRY" = 1 ]; then
    export EXPLAINPRUNE_TEST_DEVICE=cpu
    DEV=cpu; SHAPE7=tiny; SHAPE2=tiny; T7=(16); T2=(16); TLONG=(36); EXTRA=(--label-samples 1)
    SLOW=4  # a shared CPU machine (CI, a loaded laptop): the same steps, more time each
else
    DEV=cuda; SHAPE7=7b; SHAPE2=2b; T7=(1296 5776); T2=(1296); TLONG=(14884); EXTRA=(--label-samples 4)
    SLOW=1
fi
TARGET="$(mktemp -d "${TMPDIR:-/tmp}/explainprune-site.XXXXXX")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/explainprune-gpu-check.XXXXXX")"  # per-step logs and JSON
trap 'rm -rf "$TARGET" "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: > "$STEPS"
: > "$OUTDIR/gpu_check.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $WORK/NAME.log, record rc and time
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS rc
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    tail -n 25 "$WORK/$name.log"
    { echo "===== $name: $*"; cat "$WORK/$name.log"; } >> "$OUTDIR/gpu_check.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    return 0
}

# 1. the bundle: the wheels this interpreter can take (all of them on the GPU machine; in the dry run on
#    another Python the binary ones for cp312 are listed and left out)
mapfile -t WHEELS < <("$PY" benchmarks/gpu_check.py wheels "$BUNDLE" --dry-run "$DRY")
if [ "${#WHEELS[@]}" -gt 0 ]; then
    step install $((45 * SLOW)) "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TARGET" "${WHEELS[@]}"
else
    echo "== install: no usable wheels in $BUNDLE (run 'make gpu-bundle' on a machine with a package index)"
    printf 'install\t2\t0\n' >> "$STEPS"
fi
export PYTHONPATH="$ROOT/src:$TARGET:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 2. versions
step env $((30 * SLOW)) "$PY" benchmarks/gpu_check.py env --json "$WORK/env.json"

# 3. the CUDA tests
TIMEOUT_OPT=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then TIMEOUT_OPT=(-p pytest_timeout --timeout 60); fi
step tests $((120 * SLOW)) "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o addopts="" -rA "${TIMEOUT_OPT[@]}" \
    --junitxml "$WORK/tests.xml"

# 4. real shapes (random weights; nothing downloaded)
step real_scale_7b $((120 * SLOW)) "$PY" benchmarks/real_scale.py --device "$DEV" --shape "$SHAPE7" --tokens "${T7[@]}" \
    "${EXTRA[@]}" --json "$WORK/real_scale_7b.json"
step real_scale_2b $((45 * SLOW)) "$PY" benchmarks/real_scale.py --device "$DEV" --shape "$SHAPE2" --tokens "${T2[@]}" \
    --relevance-repeats 0 --label-samples 0 --json "$WORK/real_scale_2b.json"
step real_scale_7b_long $((60 * SLOW)) "$PY" benchmarks/real_scale.py --device "$DEV" --shape "$SHAPE7" --tokens "${TLONG[@]}" \
    --repeats 1 --label-samples 0 --json "$WORK/real_scale_7b_long.json"

# 5. the summary (always)
"$PY" benchmarks/gpu_check.py summary "$WORK" --dry-run "$DRY" --json "$OUTDIR/results.json" | tee "$OUTDIR/summary.md"
awk -F'\t' '$2 != 0 {bad = 1} END {exit bad}' "$STEPS"

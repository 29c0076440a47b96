#!/usr/bin/env bash
# The whole product in one command, on a laptop-class CPU (no GPU, no download beyond pip):
#   1. scripts/setup.sh                       system packages + .venv (idempotent)
#   2. fastvit-reduce sample                  ImageNet-layout photos from scikit-image's own files
#   3. scripts/write_imagenet.sh              ImageFolder -> train/val .beton (ffcv)
#   4. fastvit-reduce sweep --paired --seeds  baseline / thin / shallow / grouped tiny ViTs on CPU,
#                                             in one process on the same batches (decoded and
#                                             augmented once; the comparison is strategy, not noise),
#                                             once per seed (SEEDS=0,1,2 by default)
#   5. the comparison table, each variant's difference from the baseline with its 95 % interval
#      over the seeds, the per-epoch differences and the plot
# Everything goes under demo_out/ (git-ignored; DEMO_OUT=dir to change it). Re-running reuses the
# sample, the .beton files and the finished runs, so it is also how to resume an interrupted demo.
# Target: under 10 minutes on 2 cores. Exit code: non-zero if any step or any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-demo_out}
RES=96          # px stored in the .beton (long side); the demo ViTs train at 64 px
SEEDS=${SEEDS:-0,1,2}  # training.seed of each paired run: the intervals need two or more
START=$(date +%s)
step() { printf '\n=== [%4d s] %s\n' "$(( $(date +%s) - START ))" "$*"; }

step "1/5 setup"
bash scripts/setup.sh
FVR=.venv/bin/fastvit-reduce
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

step "2/5 sample data -> $OUT/sample"
"$FVR" sample --out "$OUT/sample"

step "3/5 .beton files -> $OUT/betons"
shopt -s nullglob
train=("$OUT"/betons/train_*.beton) val=("$OUT"/betons/val_*.beton)
if [ ${#train[@]} -eq 1 ] && [ ${#val[@]} -eq 1 ]; then
    echo "demo: reusing ${train[0]} and ${val[0]}"
else
    rm -rf "$OUT/betons" && mkdir -p "$OUT/betons"
    IMAGENET_DIR="$OUT/sample" WRITE_DIR="$OUT/betons" bash scripts/write_imagenet.sh "$RES" 0.50 90
    train=("$OUT"/betons/train_*.beton) val=("$OUT"/betons/val_*.beton)
fi
if [ ${#train[@]} -ne 1 ] || [ ${#val[@]} -ne 1 ]; then
    echo "demo: expected one train_*.beton and one val_*.beton in $OUT/betons" >&2
    exit 1
fi

step "4/5 paired sweep: baseline, thin, shallow, grouped (CPU, one process, same batches), seeds $SEEDS -> $OUT/runs"
rc=0
"$FVR" sweep --paired --seeds "$SEEDS" rn_configs/sample/{baseline,thin,shallow,grouped}.yaml --out "$OUT/runs" \
    --set "data.train_dataset=$(realpath "${train[0]}")" \
    --set "data.val_dataset=$(realpath "${val[0]}")" || rc=$?

step "5/5 done (sweep exit code $rc)"
echo "table: $OUT/runs/sweep_summary.md"
echo "csv:   $OUT/runs/sweep_summary.csv"
[ -f "$OUT/runs/sweep_summary.png" ] && echo "plot:  $OUT/runs/sweep_summary.png"
echo "rebuild the table any time: $FVR report $OUT/runs"
exit $rc

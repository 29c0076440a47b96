#!/usr/bin/env bash
# Write ImageNet's train and val splits as FFCV .beton files, like ffcv-imagenet's write_imagenet.sh.
#
#   IMAGENET_DIR=/data/imagenet WRITE_DIR=/data/ffcv scripts/write_imagenet.sh 256 0.50 90
#     -> /data/ffcv/train_256_0.50_90.beton and /data/ffcv/val_256_0.50_90.beton
#        (+ .classes.json and .report.json beside each)
#
# IMAGENET_DIR holds train/ and val/, each with one folder per class (ImageFolder layout).
# Extra arguments go to every `fastvit-reduce write` call, e.g. --cfg.num_workers=16.
# Uses the repository's .venv when present, else the `fastvit-reduce` on PATH (Docker image).
# DRY_RUN=1 prints the two commands instead of running them.
set -euo pipefail

usage() {
    [ $# -gt 0 ] && echo "write_imagenet.sh: $*" >&2
    cat >&2 <<'USAGE'
usage: IMAGENET_DIR=DIR WRITE_DIR=DIR scripts/write_imagenet.sh MAX_RES COMPRESS_PROB JPEG_QUALITY [--cfg.KEY=VALUE ...]
  MAX_RES        long side of the stored images in px (e.g. 256; ffcv-imagenet's ResNet-50 uses 500)
  COMPRESS_PROB  share of images stored as JPEG, the rest as raw pixels (e.g. 0.50)
  JPEG_QUALITY   JPEG quality 1-100 (e.g. 90)
USAGE
    exit 2
}

[ $# -ge 3 ] || usage "expected 3 arguments, got $#"
MAX_RES=$1 COMPRESS_PROB=$2 JPEG_QUALITY=$3
shift 3
[[ $MAX_RES =~ ^[0-9]+$ ]] || usage "MAX_RES must be a whole number of pixels, got '$MAX_RES'"
[[ $COMPRESS_PROB =~ ^(0|1)?(\.[0-9]+)?$ && -n $COMPRESS_PROB ]] || usage "COMPRESS_PROB must be a number in [0, 1], got '$COMPRESS_PROB'"
[[ $JPEG_QUALITY =~ ^[0-9]+$ ]] || usage "JPEG_QUALITY must be a whole number 1-100, got '$JPEG_QUALITY'"
[ -n "${IMAGENET_DIR:-}" ] || usage "set IMAGENET_DIR to the folder holding train/ and val/"
for split in train val; do
    [ -d "$IMAGENET_DIR/$split" ] || usage "no $split/ folder in IMAGENET_DIR=$IMAGENET_DIR"
done
[ -n "${WRITE_DIR:-}" ] || usage "set WRITE_DIR to the folder for the .beton files"
[ -d "$WRITE_DIR" ] || usage "WRITE_DIR=$WRITE_DIR is not a folder (create it first)"

REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$REPO/.venv/bin/python" ]; then
    WRITE=(env "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}" "$REPO/.venv/bin/python" -m fastvit_reduce.write)
elif command -v fastvit-reduce >/dev/null; then
    WRITE=(fastvit-reduce write)
else
    echo "write_imagenet.sh: no $REPO/.venv (run scripts/setup.sh) and no fastvit-reduce on PATH" >&2
    exit 2
fi

for split in train val; do
    ${DRY_RUN:+printf '%q '} "${WRITE[@]}" --cfg.data_dir="$IMAGENET_DIR" --cfg.split=$split \
        --cfg.write_path="$WRITE_DIR/${split}_${MAX_RES}_${COMPRESS_PROB}_${JPEG_QUALITY}.beton" \
        --cfg.max_resolution="$MAX_RES" --cfg.write_mode=proportion \
        --cfg.compress_probability="$COMPRESS_PROB" --cfg.jpeg_quality="$JPEG_QUALITY" "$@"
    [ -z "${DRY_RUN:-}" ] || echo
done

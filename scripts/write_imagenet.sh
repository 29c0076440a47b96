#!/usr/bin/env bash
# Write ImageNet's train and val splits as FFCV .beton files, like ffcv-imagenet's write_imagenet.sh.
#
#   IMAGENET_DIR=/data/imagenet WRITE_DIR=/data/ffcv scripts/write_imagenet.sh 512 0.50 90
#   (the same as giving no numbers: 512 0.50 90 is the default)
#     -> /data/ffcv/train_512_0.50_90.beton and /data/ffcv/val_512_0.50_90.beton
#        (+ .classes.json and .report.json beside each)
#
# Storage resolution (MAX_RES caps the long side; ImageNet JPEGs are ~500x375, so 512 keeps
# nearly every photo at its own size):
#   512  the default. Random-resized crops for 224 px are cut from the photo itself, and the val
#        crop (short side 224/0.9 = 248 bicubic, centre 224) has the pixels timm's eval uses, as
#        the seed trains on full-resolution JPEGs. ffcv-imagenet's ResNet-50 data uses 500.
#   256  a fast option (`write_imagenet.sh 256 0.50 90` -> train_256_0.50_90.beton): ~1/4 of the
#        pixels to store and decode, but most 224 px crops and the whole val crop (0.9 x ~192 =
#        ~172 px) are then upsampled to 224: a candidate cause of top-1 below the seed's recipe
#        (not yet measured alone). Use it for quick experiments, not for numbers
#        compared with the seed.
#
# IMAGENET_DIR holds train/ and val/, each with one folder per class (ImageFolder layout).
# Extra arguments go to every `fastvit-reduce write` call, e.g. --cfg.num_workers=16.
# Uses the repository's .venv when present, else the `fastvit-reduce` on PATH (Docker image).
# DRY_RUN=1 prints the two commands instead of running them.
set -euo pipefail

usage() {
    [ $# -gt 0 ] && echo "write_imagenet.sh: $*" >&2
    cat >&2 <<'USAGE'
usage: IMAGENET_DIR=DIR WRITE_DIR=DIR scripts/write_imagenet.sh [MAX_RES COMPRESS_PROB JPEG_QUALITY] [--cfg.KEY=VALUE ...]
  (no numbers = 512 0.50 90, the default)
  MAX_RES        long side of the stored images in px (512 recommended; 256 = fast option, lower top-1)
  COMPRESS_PROB  share of images stored as JPEG, the rest as raw pixels (e.g. 0.50)
  JPEG_QUALITY   JPEG quality 1-100 (e.g. 90)
USAGE
    exit 2
}

if [ $# -eq 0 ] || [[ $1 == --* ]]; then
    set -- 512 0.50 90 "$@"  # the default storage (see the header)
fi
[ $# -ge 3 ] || usage "expected MAX_RES COMPRESS_PROB JPEG_QUALITY (or none, for 512 0.50 90), got $# argument(s)"
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
    WRITE=(env "PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}" "$REPO/.venv/bin/python" -m fastvit_reduce.cli write)
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

#!/usr/bin/env bash
# Reproduces the shipped default model (models/default) from scratch on a 2-core CPU machine in two stages:
#   1. the tokenizer, end to end, on one thread           (configs/tokenizer/shapes-64-stage1.json)
#   2. the diffusion and AR generators on the frozen tokenizer's bits, side by side, one thread each
#                                                          (configs/diffusion/shapes-64.json, configs/ar/shapes-64.json)
# then picks each generator's guidance scale on a probe prompt set (seed 1000, not the published evaluation's
# seed 0), and bundles the EMA weights in float16. Wall times measured on an AMD EPYC (AVX2) are in the README,
# "The shipped model". Every stage resumes where it stopped (--resume auto): run the script again after an
# interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/default}
OUT=${OUT:-models/default}
export OMP_NUM_THREADS=1

binlat train tokenizer --config configs/tokenizer/shapes-64-stage1.json --output "$RUNS/tokenizer" --resume auto
binlat export "$RUNS/tokenizer" --out "$RUNS/export-tokenizer"

binlat train diffusion --config configs/diffusion/shapes-64.json --output "$RUNS/diffusion" \
    --set generator.tokenizer="$RUNS/export-tokenizer" --resume auto &
binlat train ar --config configs/ar/shapes-64.json --output "$RUNS/ar" \
    --set generator.tokenizer="$RUNS/export-tokenizer" --resume auto &
wait
for part in diffusion ar; do binlat export "$RUNS/$part" --out "$RUNS/export-$part"; done

binlat bundle --tokenizer "$RUNS/export-tokenizer" --diffusion "$RUNS/export-diffusion" --ar "$RUNS/export-ar" \
    --description "shapes-64 demo model: 64x16-bit tokenizer, diffusion and AR generators, all-MiniLM-L6-v2 text" \
    --dtype float16 --out "$RUNS/bundle-untuned"

# Guidance: judge 8 prompts per category at each scale on prompt seed 1000 and keep the best per generator.
best() {  # best GENERATOR SCALES...: prints the scale with the highest overall accuracy (the first on ties)
    local gen=$1 w top=-1 pick=
    shift
    for w in "$@"; do
        binlat eval shapes --model "$RUNS/bundle-untuned" --generator "$gen" --per-category 8 --seed 1000 \
            --cfg "$w" --no-held-out --out "$RUNS/guidance/$gen-$w" >/dev/null
        acc=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['overall'])" \
            "$RUNS/guidance/$gen-$w/report-shapes.json")
        if python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$acc" "$top"; then
            top=$acc pick=$w
        fi
    done
    echo "$pick"
}
W_DIFFUSION=$(best diffusion 1.5 3 5 8)
W_AR=$(best ar 1.5 3 5 8)
echo "guidance: diffusion $W_DIFFUSION, AR $W_AR"

binlat bundle --tokenizer "$RUNS/export-tokenizer" --diffusion "$RUNS/export-diffusion" --ar "$RUNS/export-ar" \
    --description "shapes-64 demo model: 64x16-bit tokenizer, diffusion and AR generators, all-MiniLM-L6-v2 text" \
    --sampling "{\"diffusion\": {\"guidance_scale\": $W_DIFFUSION, \"num_steps\": 20}, \"ar\": {\"guidance_scale\": $W_AR}}" \
    --dtype float16 --out "$OUT"

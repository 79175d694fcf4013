#!/usr/bin/env bash
# Reproduces the shipped default model (models/default) from scratch on a CPU machine, in four stages.
# Wall times are those measured on the 2-core VM the release was trained on (see README, "The shipped model").
#   1. tokenizer, end to end                                   (configs/tokenizer/shapes-64.json)
#   2. decoder-only fine-tuning on the frozen stage-1 encoder  (configs/tokenizer/shapes-64-decoder.json)
#   3. diffusion and 4. AR generators on the same frozen encoder's bits; 2-4 run side by side, one thread each.
# Then the EMA weights are exported and bundled in float16.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/default}
OUT=${OUT:-models/default}
TOKENIZER_STEPS=${TOKENIZER_STEPS:-4500}

binlat train tokenizer --config configs/tokenizer/shapes-64.json --output "$RUNS/tokenizer" \
    --max-steps "$TOKENIZER_STEPS" --resume auto
binlat export "$RUNS/tokenizer" --out "$RUNS/tokenizer-stage1"

export OMP_NUM_THREADS=1
binlat train tokenizer --config configs/tokenizer/shapes-64-decoder.json --output "$RUNS/decoder" \
    --set tokenizer.init_from="$RUNS/tokenizer-stage1" --resume auto &
binlat train diffusion --config configs/diffusion/shapes-64.json --output "$RUNS/diffusion" \
    --set generator.tokenizer="$RUNS/tokenizer-stage1" --resume auto &
binlat train ar --config configs/ar/shapes-64.json --output "$RUNS/ar" \
    --set generator.tokenizer="$RUNS/tokenizer-stage1" --resume auto &
wait
unset OMP_NUM_THREADS

for part in decoder diffusion ar; do binlat export "$RUNS/$part" --out "$RUNS/export-$part"; done
# Guidance scales were picked by judging 8 prompts per category at w = 1.5, 3, 5 (and 8 for diffusion) on prompt
# seed 1000, not the published evaluation's seed 0:
#   binlat eval shapes --model DIR --generator diffusion --per-category 8 --seed 1000 --cfg W --no-held-out
binlat bundle --tokenizer "$RUNS/export-decoder" --diffusion "$RUNS/export-diffusion" --ar "$RUNS/export-ar" \
    --description "shapes-64 demo model: 32x32-bit tokenizer, diffusion and AR generators, all-MiniLM-L6-v2 text" \
    --sampling '{"diffusion": {"guidance_scale": 3.0, "num_steps": 20}, "ar": {"guidance_scale": 5.0}}' \
    --dtype float16 --out "$OUT"

#!/usr/bin/env bash
# Reproduces the shipped default model (models/default) from scratch on a 2-core CPU machine in two stages:
#   1. the tokenizer, end to end, on one thread           (configs/tokenizer/shapes-64-stage1.json)
#   2. the diffusion and AR generators on the frozen tokenizer's bits, side by side, one thread each
#                                                          (configs/diffusion/shapes-64.json, configs/ar/shapes-64.json);
#      diffusion then continues twice 3,000 steps on a category-weighted data mix (--data shapes:single=0.5,...)
# then picks each generator's guidance scale on a probe prompt set (seed 1000, not the published evaluation's
# seed 0), and bundles the EMA weights in float16. Wall times measured on an AMD EPYC (AVX2) are in the README,
# "The shipped model". Every stage resumes where it stopped (--resume auto): run the script again after an
# interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev setup                      # the same .venv as the demo and the tests
export PATH="$PWD/.venv/bin:$PATH"
RUNS=${RUNS:-runs/default}
OUT=${OUT:-models/default}
export OMP_NUM_THREADS=1

binlat train tokenizer --config configs/tokenizer/shapes-64-stage1.json --output "$RUNS/tokenizer" --resume auto
binlat export "$RUNS/tokenizer" --out "$RUNS/export-tokenizer"

MIX=shapes:single=0.5,colors=0.5,counting=1.5,position=2,color_attr=2  # the category-weighted data mix
continue_on_mix() {  # FROM_RUN RUN MAX_STEPS: continue FROM_RUN's last checkpoint on the mix, cosine over MAX_STEPS
    local from=auto  # RUN's own last checkpoint when it has one (--resume auto), else FROM_RUN's last
    compgen -G "$RUNS/$2/checkpoints/step-*" >/dev/null || from=$(ls -d "$RUNS/$1/checkpoints"/step-* | tail -n 1)
    binlat train diffusion --config configs/diffusion/shapes-64.json --output "$RUNS/$2" \
        --set generator.tokenizer="$RUNS/export-tokenizer" --resume "$from" --max-steps "$3" --data "$MIX"
}
diffusion() {  # 3,000 steps on the uniform stream, then twice 3,000 more on the mix (docs/recipe.md, rows GG and GI)
    binlat train diffusion --config configs/diffusion/shapes-64.json --output "$RUNS/diffusion" \
        --set generator.tokenizer="$RUNS/export-tokenizer" --resume auto
    continue_on_mix diffusion diffusion-mix 6000
    continue_on_mix diffusion-mix diffusion-mix2 9000
}
diffusion &
diffusion_job=$!
binlat train ar --config configs/ar/shapes-64.json --output "$RUNS/ar" \
    --set generator.tokenizer="$RUNS/export-tokenizer" --resume auto &
ar_job=$!
wait "$diffusion_job"   # a plain `wait` would not stop the script (set -e) when one of them fails
wait "$ar_job"
binlat export "$RUNS/diffusion-mix2" --out "$RUNS/export-diffusion"
binlat export "$RUNS/ar" --out "$RUNS/export-ar"

binlat bundle --tokenizer "$RUNS/export-tokenizer" --diffusion "$RUNS/export-diffusion" --ar "$RUNS/export-ar" \
    --description "shapes-64 demo model: 64x16-bit tokenizer, diffusion and AR generators, all-MiniLM-L6-v2 text" \
    --dtype float16 --out "$RUNS/bundle-untuned"

# Sampling: judge 8 prompts per category at each guidance scale W and temperature T on prompt seed 1000 (not the
# published evaluation's seed 0) and keep the best pair per generator.
best() {  # best GENERATOR W:T...: prints "W T" of the highest overall accuracy (the first on ties)
    local gen=$1 pair top=-1 pick=
    shift
    for pair in "$@"; do
        local w=${pair%%:*} t=${pair##*:}
        binlat eval shapes --model "$RUNS/bundle-untuned" --generator "$gen" --per-category 8 --seed 1000 \
            --cfg "$w" --temperature "$t" --no-held-out --no-progress --out "$RUNS/sampling/$gen-w$w-t$t" >/dev/null
        acc=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['overall'])" \
            "$RUNS/sampling/$gen-w$w-t$t/report-shapes.json")
        echo "sampling: $gen w=$w temperature=$t accuracy $acc" >&2
        if python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$acc" "$top"; then
            top=$acc pick="$w $t"
        fi
    done
    echo "$pick"
}
mkdir -p "$RUNS/sampling"
best diffusion 1:1 1.5:1 2:1 3:1 5:1 > "$RUNS/sampling/pick-diffusion" &   # the two sweeps side by side
best ar 1:1 1.5:1 2:1 3:1 1.5:0.7 2:0.7 3:0.7 > "$RUNS/sampling/pick-ar" &
wait
read -r W_DIFFUSION T_DIFFUSION < "$RUNS/sampling/pick-diffusion"
read -r W_AR T_AR < "$RUNS/sampling/pick-ar"
echo "sampling: diffusion w=$W_DIFFUSION temperature=$T_DIFFUSION, AR w=$W_AR temperature=$T_AR"

binlat bundle --tokenizer "$RUNS/export-tokenizer" --diffusion "$RUNS/export-diffusion" --ar "$RUNS/export-ar" \
    --description "shapes-64 demo model: 64x16-bit tokenizer, diffusion and AR generators, all-MiniLM-L6-v2 text" \
    --sampling "{\"diffusion\": {\"guidance_scale\": $W_DIFFUSION, \"temperature\": $T_DIFFUSION, \"num_steps\": 20}, \"ar\": {\"guidance_scale\": $W_AR, \"temperature\": $T_AR}}" \
    --dtype float16 --out "$OUT"

#!/usr/bin/env bash
# E2E fine-tuning rows on the `tiny` LCM student (Table 2 analog, first pass), evaluated on the validation split
# (for choices) and the test split (for reporting), plus the memory and step-time benchmarks at the `base` preset.
# Inputs in .gpu/models (tiny_lcm.safetensors, classifier/, lpips_fashion.safetensors); resumable run folders.
#   bash scripts/gpu/tiny_e2e.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist} E2EDIFF_CACHE=${E2EDIFF_CACHE:-$PWD/.gpu/cache}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
M=${M:-.gpu/models}; R=${R:-runs/gpu-tiny-e2e}; STEPS=${STEPS:-600}; SECS=${SECS:-75}; N=${EVAL_N:-10000}
mkdir -p "$R"
E="python3 -m e2ediff"
LCM="$M/tiny_lcm.safetensors"; CLS="$M/classifier"; LP="$M/lpips_fashion.safetensors"
stage() { local name=$1; shift; local t0=$SECONDS; echo "=== $name"; "$@"; echo "=== $name done rc=$? in $((SECONDS - t0)) s"; }
evals() {  # evals NAME MODEL K...: test (reporting) and val (selection) rows
  local name=$1 model=$2; shift 2
  for k in "$@"; do
    for split in val test; do
      $E evaluate --checkpoint "$model" --classifier "$CLS" --steps "$k" --num-samples "$N" --split $split \
        --output "$R/eval_${name}_k${k}_${split}.json" | sed "s/^/$name k=$k $split: /"
    done
  done
}
COMMON="init=$LCM train.steps=$STEPS train.checkpoint_every=100 train.progress=false train.log_every=20 optim.lr=${LR:-2e-5}"
run() {  # run NAME K overrides...
  local name=$1 k=$2; shift 2
  stage "$name" timeout "$SECS" $E finetune --run-dir "$R/$name" $COMMON sampler_steps=$k "$@"
  evals "$name" "$R/$name/model.safetensors" $k
}
if [ -z "${SWEEP:-}" ]; then
python3 benchmarks/e2e_memory.py --device cuda 2>&1 | tail -8
python3 benchmarks/step_time.py --device cuda 2>&1 | tail -6
evals lcm "$LCM" 1 2 4
run energy4 4 samples_per_caption=4 train.batch_size=64
run l2_4 4 samples_per_caption=1 train.batch_size=256 loss.energy=0 loss.l2=1
run energy2 2 samples_per_caption=4 train.batch_size=64
run l2lpips4 4 samples_per_caption=1 train.batch_size=256 loss.energy=0 loss.l2=1 loss.lpips=1 loss.lpips_weights=$LP
run l2ot4 4 samples_per_caption=4 train.batch_size=64 loss.energy=0 loss.l2=1 loss.coupling=minibatch_ot
else  # the learning-rate sweep of the energy rows (second pass, chosen on the validation split)
run energy4_lr1e-4 4 samples_per_caption=4 train.batch_size=64 optim.lr=1e-4
run energy2_lr1e-4 2 samples_per_caption=4 train.batch_size=64 optim.lr=1e-4
run energy2_lr3e-4 2 samples_per_caption=4 train.batch_size=64 optim.lr=3e-4
fi
if [ -n "${OUT:-}" ]; then
  for d in "$R"/*/; do n=$(basename "$d"); [ -f "$d/model.safetensors" ] && cp "$d/model.safetensors" "$OUT/tiny_e2e_$n.safetensors"; done
  tar czf "$OUT/e2e_logs.tgz" "$R"/*.json "$R"/*/metrics.jsonl "$R"/*/config.yaml 2>/dev/null
fi

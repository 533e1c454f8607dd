#!/usr/bin/env bash
# A CPU-sized probe of the issue-#9 losses (docs/results.md, "CPU probe"): three short E2E fine-tunes of the shipped
# `base` student that differ only in the loss — same K mix {1, 2, 4}, w in [1, 2], lr, batch and seed — then the
# student and each fine-tune scored at K = 1, 2, 4 on the validation split, all in one run.
#
#   STEPS=100 LR=1e-5 EVAL_N=2000 bash scripts/cpu_probe.sh      # ~30 min on 2 cores
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/cpu-probe}; N=${EVAL_N:-2000}; STEPS=${STEPS:-100}; LR=${LR:-1e-5}; SEED=${SEED:-0}
E=${E2EDIFF:-.venv/bin/e2ediff}; LCM=checkpoints/base/lcm.safetensors; LP=checkpoints/lpips_fashion.safetensors
mkdir -p "$R"
COMMON="sampler_steps_mix=[1,2,4] w_range=[1.0,2.0] optim.lr=$LR train.steps=$STEPS train.batch_size=8
        samples_per_caption=4 train.checkpoint_every=$STEPS train.log_every=10 train.progress=false
        train.device=cpu train.seed=$SEED"
row() { local name=$1; shift; $E finetune --preset base --run-dir "$R/$name" init=$LCM $COMMON "$@" > "$R/$name.log" 2>&1; }
row energy_latent loss.space=latent &
row energy_features loss.space=features loss.lpips_weights=$LP &
row bank_features loss.space=features loss.real_bank=16 loss.lpips_weights=$LP &
wait
for name in student energy_latent energy_features bank_features; do
  model=$R/$name/model.safetensors; [ "$name" = student ] && model=$LCM
  for k in 1 2 4; do
    $E evaluate --checkpoint "$model" --steps $k --num-samples "$N" --split val --device cpu \
      --output "$R/eval_${name}_k${k}_val.json" 2>&1 | tail -n 1 | sed "s/^/$name K=$k: /"
  done
done

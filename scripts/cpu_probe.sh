#!/usr/bin/env bash
# CPU-sized probes of the issue-#9 losses (docs/results.md, "CPU probes"): short E2E fine-tunes of the shipped `base`
# student that differ only in the loss — same K mix {1, 2, 4}, lr, batch and seed — then the student and each
# fine-tune scored at K = 1, 2, 4 on the validation split, in one run.
#
#   PROBE=losses bash scripts/cpu_probe.sh   # w drawn in [1, 2] while training: latent / feature energy, feature bank
#   PROBE=w1     bash scripts/cpu_probe.sh   # trained at w = 1 (the unguided input), sampled at the student's w = 1.5
#   PROBE=k24    bash scripts/cpu_probe.sh   # adversarial recipe, K from {1, 2, 4} vs {2, 4}
#   PROBE=teacher bash scripts/cpu_probe.sh  # from base/e2e: the regression to the guided teacher's DDIM-16 endpoint
#                                            # alone (loss.anchor_to=teacher, no other term) vs the starting file
#
# STEPS (100), LR (1e-5), EVAL_N (2000), SEED (0). ~30 min on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PROBE=${PROBE:-losses}; R=${R:-runs/cpu-probe-$PROBE}; N=${EVAL_N:-2000}; STEPS=${STEPS:-100}; LR=${LR:-1e-5}
SEED=${SEED:-0}; E=${E2EDIFF:-.venv/bin/e2ediff}; LCM=checkpoints/base/lcm.safetensors
LP=checkpoints/lpips_fashion.safetensors
mkdir -p "$R"
COMMON="sampler_steps_mix=[1,2,4] optim.lr=$LR train.steps=$STEPS train.batch_size=8 samples_per_caption=4
        train.checkpoint_every=$STEPS train.log_every=10 train.progress=false train.device=cpu train.seed=$SEED"
row() { local name=$1; shift; $E finetune --preset base --run-dir "$R/$name" init=$LCM $COMMON "$@" > "$R/$name.log" 2>&1; }
evaluate() {  # evaluate NAME MODEL [flags]: K = 1, 2, 4 on the validation split
  local name=$1 model=$2; shift 2
  for k in 1 2 4; do
    $E evaluate --checkpoint "$model" --steps $k --num-samples "$N" --split val --device cpu "$@" \
      --output "$R/eval_${name}_k${k}_val.json" 2>&1 | tail -n 1 | sed "s/^/$name K=$k: /"
  done
}
case "$PROBE" in
losses)
  row energy_latent loss.space=latent w_range=[1.0,2.0] &
  row energy_features loss.space=features loss.lpips_weights=$LP w_range=[1.0,2.0] &
  row bank_features loss.space=features loss.real_bank=16 loss.lpips_weights=$LP w_range=[1.0,2.0] &
  wait
  evaluate student $LCM
  for name in energy_latent energy_features bank_features; do evaluate $name "$R/$name/model.safetensors"; done
  ;;
w1)
  row energy_features_w1 loss.space=features loss.lpips_weights=$LP w=1.0 &
  row bank_features_w1 loss.space=features loss.real_bank=16 loss.lpips_weights=$LP w=1.0 &
  wait
  for name in energy_features_w1 bank_features_w1; do evaluate $name "$R/$name/model.safetensors" --w 1.5; done
  ;;
k24)   # the adversarial recipe with K drawn from {1, 2, 4} vs from {2, 4}: does training K = 1 cost K = 2?
  ADV="loss.energy=0 loss.gan=1.0 loss.gan_space=features loss.r1=1.0 loss.lpips_weights=$LP w_range=[1.0,2.0]"
  row adversarial_mix124 $ADV &
  row adversarial_mix24 $ADV "sampler_steps_mix=[2,4]" &
  wait
  evaluate student $LCM
  for name in adversarial_mix124 adversarial_mix24; do evaluate $name "$R/$name/model.safetensors"; done
  ;;
teacher)   # does regressing base/e2e's samples onto the guided teacher's endpoints (the chain's w) move K = 2 and 4
  # toward the teacher (val FD 1.10, alignment 0.937 at DDIM-32, w = 1.5)? No other loss term. Rows: teacher16, the
  # ODE endpoint from z_T (DDIM-16); teacher16r, the teacher in the student's sampler with its re-noise draws
  # (loss.teacher_renoise). ROWS picks rows; rows and scores already in $R are kept.
  # TEACHER: the base teacher (not shipped; `git show 0ae16b9:checkpoints/base/teacher.safetensors > FILE`).
  # INIT: the starting file (default base/e2e); X: more overrides, e.g. X="sampler_steps=2 sampler_steps_mix=null"
  # with INIT=checkpoints/base/e2e_2step.safetensors for the two-step model.
  T=${TEACHER:-$R/teacher.safetensors}; INIT=${INIT:-checkpoints/base/e2e.safetensors}
  [ -f "$T" ] || git show 0ae16b9:checkpoints/base/teacher.safetensors > "$T"
  for name in ${ROWS:-teacher16 teacher16r}; do
    x=""; [ "$name" = teacher16r ] && x="loss.teacher_renoise=true"
    [ -f "$R/$name/model.safetensors" ] || $E finetune --preset base --run-dir "$R/$name" init=$INIT $COMMON \
      w_range=[1.0,2.0] loss.energy=0 loss.anchor=10 loss.anchor_to=teacher loss.teacher="$T" \
      loss.teacher_steps=16 $x ${X:-} > "$R/$name.log" 2>&1
  done
  for k in ${KS:-2 4}; do
    for name in start ${ROWS:-teacher16 teacher16r}; do
      model=$INIT; [ $name = start ] || model=$R/$name/model.safetensors
      [ -f "$R/eval_${name}_k${k}_val.json" ] && continue
      $E evaluate --checkpoint "$model" --steps $k --num-samples "$N" --split val --device cpu --w 1.5 \
        --output "$R/eval_${name}_k${k}_val.json" 2>&1 | tail -n 1 | sed "s/^/$name K=$k: /"
    done
  done
  ;;
*) echo "PROBE must be losses, w1, k24 or teacher" >&2; exit 2 ;;
esac

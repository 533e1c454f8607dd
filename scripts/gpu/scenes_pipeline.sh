#!/usr/bin/env bash
# The whole fashion-scenes pipeline in ONE device call (< 9.5 min on one H100/H200): autoencoder, DiT teacher, LCM
# student, the E2E rows, every evaluation. Independent rows run as concurrent processes on the one GPU.
#
#   DATA_DIR=.gpu/fashion-mnist SCENES_CACHE=.gpu/scenes-text.safetensors bash scripts/gpu/scenes_pipeline.sh
#   TINY=1 PY=.venv/bin/python bash scripts/gpu/scenes_pipeline.sh      # CPU smoke run: a few steps each
#
# Inputs: DATA_DIR (the Fashion-MNIST .gz files) and SCENES_CACHE (the clause text cache, 1.7 MB:
# `e2ediff encode-prompts --dataset fashion-scenes --output .gpu/scenes-text.safetensors`; the GPU machine has no MiniLM).
# Every training stage is time-limited (train.max_seconds: *_SECONDS) and resumes from its run folder in $R, so a
# second call on a still-warm machine continues where the first stopped; STAGES="lcm e2e" skips finished stages, and
# TEACHER=/LCM= start from model files brought back earlier. Rows (Tables 1-2 of the paper on scenes):
#   teacher DDIM-32, DDIM-4; LCM student K = 1, 2, 4; E2E (the project's default loss: energy score, m = 4) K = 1, 2, 4;
#   the paper's losses at K = 4: L1, L2, LPIPS, L2 + LPIPS, L2 + LPIPS + GAN.
# With $OUT set (the device tool): eval JSONs + logs in one tar, float16 teacher / student / E2E K=4 model files.
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${DATA_DIR:-${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist}}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
CACHE=${SCENES_CACHE:-$PWD/.gpu/scenes-text.safetensors}
CLS=${CLS:-checkpoints/classifier}; LP=${LP:-checkpoints/lpips_fashion.safetensors}
E="${PY:-python3} -m e2ediff"
T0=$SECONDS
if [ -n "${TINY:-}" ]; then   # CPU smoke run: tiny models, a few steps, few samples
  R=${R:-runs/scenes-tiny}; N=${EVAL_N:-16}; DEV=cpu
  AE_X="model.channels=[8,16,32] model.norm_groups=4 scale_samples=32 train.steps=${AE_STEPS:-3}"
  NET_X="model.hidden_size=32 model.depth=1 model.num_heads=2"
  SMALL="data.num_scenes=128 train.batch_size=8 train.device=cpu"
  TEACHER_X="$NET_X train.steps=${TEACHER_STEPS:-3}"; LCM_X="train.steps=${LCM_STEPS:-3}"; E2E_X="train.steps=${E2E_STEPS:-2}"
  E2E_BATCH=4
else
  R=${R:-runs/scenes}; N=${EVAL_N:-2000}; DEV=auto; SMALL=""
  AE_X="train.steps=100000 train.max_seconds=${AE_SECONDS:-60}"
  TEACHER_X="train.steps=200000 train.max_seconds=${TEACHER_SECONDS:-160}"
  LCM_X="train.steps=100000 train.max_seconds=${LCM_SECONDS:-100}"
  E2E_X=""   # set after the student: the time left before DEADLINE (default 540 s) minus evaluation and copying
  E2E_BATCH=${E2E_BATCH:-32}
fi
COMMON="data.prompt_cache=$CACHE train.progress=false train.log_every=20 $SMALL"
mkdir -p "$R"
[ -f "$CACHE" ] || { echo "scene text cache $CACHE missing (e2ediff encode-prompts --dataset fashion-scenes)" >&2; exit 2; }
stage() { local name=$1; shift; local t0=$SECONDS; echo "=== $name (t=$((SECONDS - T0)) s)"; "$@"; local rc=$?
          echo "=== $name done rc=$rc in $((SECONDS - t0)) s (t=$((SECONDS - T0)) s)"; return $rc; }
want() { [[ " ${STAGES:-ae teacher lcm e2e} " == *" $1 "* ]]; }
evaluate() {  # evaluate NAME MODEL K [flags]: one JSON row $R/eval_NAME_kK.json (test split, N scenes)
  local name=$1 model=$2 k=$3; shift 3
  $E evaluate --checkpoint "$model" --classifier "$CLS" --steps "$k" --num-samples "$N" --split test \
    --prompt-cache "$CACHE" --device $DEV "$@" --output "$R/eval_${name}_k${k}.json" 2>&1 | grep -v "^Loading" \
    | sed "s/^/$name k=$k: /"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
${PY:-python3} -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

# The real test crops' classifier features, once, while the autoencoder trains (every evaluation reads them).
${PY:-python3} -c "
from pathlib import Path; from e2ediff.checkpoint import sha256_file; from e2ediff.metrics.classifier import load_classifier
from e2ediff.metrics.scenes import reference_crop_features; from e2ediff.trainer import resolve_device
c = Path('$CLS'); reference_crop_features(load_classifier(c, resolve_device('$DEV')), sha256_file(c / 'model.safetensors')[:16], 'test')
" > "$R/reference.log" 2>&1 &
REF=$!

if want ae; then
  stage autoencoder $E train-autoencoder --preset scenes --run-dir "$R/autoencoder" $COMMON train.checkpoint_every=500 $AE_X \
    > "$R/autoencoder.log" 2>&1 || { tail -3 "$R/autoencoder.log"; exit 1; }
  tail -2 "$R/autoencoder.log"
fi
if want teacher; then
  stage teacher $E pretrain --preset scenes --run-dir "$R/teacher" $COMMON autoencoder="$R/autoencoder/model.safetensors" \
    train.checkpoint_every=500 $TEACHER_X > "$R/teacher.log" 2>&1 || { tail -3 "$R/teacher.log"; exit 1; }
fi
TEACHER=${TEACHER:-$R/teacher/model.safetensors}
wait $REF
for k in 32 4; do evaluate teacher "$TEACHER" $k > "$R/eval_teacher_$k.log" & done
if want lcm; then
  stage lcm $E distill --preset scenes --run-dir "$R/lcm" $COMMON teacher="$TEACHER" train.checkpoint_every=500 $LCM_X \
    > "$R/lcm.log" 2>&1 || { tail -3 "$R/lcm.log"; exit 1; }
fi
LCM=${LCM:-$R/lcm/model.safetensors}
for k in 1 2 4; do evaluate lcm "$LCM" $k > "$R/eval_lcm_$k.log" & done
if want e2e; then
  if [ -z "${TINY:-}" ]; then
    left=$(( ${DEADLINE:-540} - (SECONDS - T0) - ${TAIL_SECONDS:-80} ))
    E2E_X="train.steps=100000 train.max_seconds=${E2E_SECONDS:-$(( left > 20 ? left : 20 ))}"
    echo "E2E rows: $E2E_X"
  fi
  ES="samples_per_caption=4 train.batch_size=$E2E_BATCH"                              # the project's default loss
  ONE="samples_per_caption=1 train.batch_size=$((E2E_BATCH * 4)) loss.energy=0"      # the paper's: 1 sample per caption
  ROWS=(
    "e2e_k1 1 $ES" "e2e_k2 2 $ES" "e2e_k4 4 $ES"
    "l1_k4 4 $ONE loss.l1=1" "l2_k4 4 $ONE loss.l2=1" "lpips_k4 4 $ONE loss.lpips=1 loss.lpips_weights=$LP"
    "l2lpips_k4 4 $ONE loss.l2=1 loss.lpips=1 loss.lpips_weights=$LP"
    "l2lpipsgan_k4 4 $ONE loss.l2=1 loss.lpips=1 loss.lpips_weights=$LP loss.gan=0.1"
  )
  for spec in "${ROWS[@]}"; do
    set -- $spec; name=$1; k=$2; shift 2
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || continue
    { stage "$name" $E finetune --preset scenes --run-dir "$R/$name" $COMMON init="$LCM" sampler_steps=$k optim.lr=${LR:-3e-6} \
        train.checkpoint_every=100 $E2E_X "$@" > "$R/$name.log" 2>&1
      [ -f "$R/$name/model.safetensors" ] && evaluate "$name" "$R/$name/model.safetensors" $k; } > "$R/eval_$name.log" 2>&1 &
  done
fi
wait
cat "$R"/eval_*.log | grep -v "^===" ; grep -h "=== .* done" "$R"/*.log
echo "total $((SECONDS - T0)) s"
if [ -n "${OUT:-}" ]; then
  $E convert "$TEACHER" "$OUT/scenes_teacher.safetensors"
  $E convert "$LCM" "$OUT/scenes_lcm.safetensors"
  for n in ${SHIP:-e2e_k4 e2e_k1}; do
    [ -f "$R/$n/model.safetensors" ] && $E convert "$R/$n/model.safetensors" "$OUT/scenes_$n.safetensors"
  done
  tar czf "$OUT/scenes_results.tgz" "$R"/eval_*.json "$R"/*.log "$R"/*/metrics.jsonl "$R"/*/config.yaml \
    "$R"/autoencoder/eval.json 2>/dev/null
  ls -la "$OUT"
fi

#!/usr/bin/env bash
# The whole `tiny` pipeline on one GPU: evaluation classifier, LPIPS feature net, autoencoder, teacher, LCM student,
# a first E2E fine-tune, and evaluation rows. Every training command resumes from its run folder, so a chunk that
# hits its time limit can simply be run again. Outputs land in $R (default runs/gpu-tiny) and, when $OUT is set
# (the device tool), the model files are copied there.
#   bash scripts/gpu/tiny_pipeline.sh            # data from .gpu/fashion-mnist, prompt cache in .gpu/cache
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist} E2EDIFF_CACHE=${E2EDIFF_CACHE:-$PWD/.gpu/cache}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=${R:-runs/gpu-tiny}
mkdir -p "$R"
E="python3 -m e2ediff"
stage() { local name=$1; shift; local t0=$SECONDS; echo "=== $name"; "$@"; echo "=== $name done rc=$? in $((SECONDS - t0)) s"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name(0))"

stage classifier $E train-classifier --output "$R/classifier" --steps ${CLS_STEPS:-4000} > "$R/classifier.log" 2>&1 &
stage lpips $E train-lpips --output "$R/lpips_fashion.safetensors" --steps ${LPIPS_STEPS:-3000} > "$R/lpips.log" 2>&1 &
stage autoencoder timeout ${AE_SECONDS:-60} $E train-autoencoder --run-dir "$R/autoencoder" train.steps=${AE_STEPS:-3000} train.batch_size=256 train.checkpoint_every=500 train.progress=false
stage teacher timeout ${TEACHER_SECONDS:-240} $E pretrain --run-dir "$R/teacher" autoencoder="$R/autoencoder/model.safetensors" \
  train.steps=${TEACHER_STEPS:-8000} train.batch_size=256 train.checkpoint_every=500 train.progress=false
stage lcm timeout ${LCM_SECONDS:-130} $E distill --run-dir "$R/lcm" teacher="$R/teacher/model.safetensors" \
  train.steps=${LCM_STEPS:-3000} train.batch_size=256 train.checkpoint_every=500 train.progress=false
wait
cat "$R"/classifier.log "$R"/lpips.log | grep -v Loading
for s in 32 4; do stage "eval teacher ddim $s" $E evaluate --checkpoint "$R/teacher" --classifier "$R/classifier" \
  --steps $s --num-samples ${EVAL_N:-10000} --output "$R/eval_teacher_ddim$s.json"; done
for k in 1 2 4; do stage "eval lcm $k" $E evaluate --checkpoint "$R/lcm" --classifier "$R/classifier" \
  --steps $k --num-samples ${EVAL_N:-10000} --output "$R/eval_lcm$k.json"; done
if [ -n "${OUT:-}" ]; then
  cp "$R/autoencoder/model.safetensors" "$OUT/tiny_autoencoder.safetensors"
  cp "$R/teacher/model.safetensors" "$OUT/tiny_teacher.safetensors"
  cp "$R/lcm/model.safetensors" "$OUT/tiny_lcm.safetensors"
  cp "$R/lpips_fashion.safetensors" "$OUT/lpips_fashion.safetensors"
  tar czf "$OUT/tiny_logs.tgz" "$R"/*.json "$R"/*.log "$R"/classifier "$R"/*/metrics.jsonl "$R"/*/config.yaml "$R"/*/eval.json 2>/dev/null
fi

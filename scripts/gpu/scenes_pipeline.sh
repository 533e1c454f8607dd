#!/usr/bin/env bash
# The fashion-scenes pipeline (issue #10) in TWO device calls of < 9.5 min each on one H100/H200.
#
# Before the calls, here: the tree plus what is carried must stay under 64 MiB, so move the `base` model files out
# (mkdir -p /tmp/hold && mv checkpoints/base/*.safetensors /tmp/hold/; back afterwards) and have
#   .gpu/fashion-mnist/*.gz (30 MB)            cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
#   .gpu/scenes-text.safetensors (4.5 MB)      e2ediff encode-prompts --dataset fashion-scenes --output .gpu/scenes-text.safetensors
#
# Call 1, autoencoder + teacher (as long as the call allows); brings back scenes_teacher.safetensors (float16, holds the
# autoencoder, 15.5 MB) and scenes_teacher.tgz (logs):
#   run  command: STAGE=teacher bash scripts/gpu/scenes_pipeline.sh
#        carry:   [".gpu/fashion-mnist", ".gpu/scenes-text.safetensors"]      timeout_s: 590
#   then here:    cp <files_at>/scenes_teacher.safetensors .gpu/
# Call 2, LCM student + E2E rows + every evaluation; reads the teacher from runs/ on a still-warm machine, else from
# .gpu/scenes_teacher.safetensors; brings back scenes_results.tgz (eval JSONs, logs, configs) and float16 student and
# headline E2E files:
#   run  command: STAGE=rows bash scripts/gpu/scenes_pipeline.sh
#        carry:   [".gpu/fashion-mnist", ".gpu/scenes-text.safetensors", ".gpu/scenes_teacher.safetensors"]
#        timeout_s: 590                                                        (tree ~6.5 MB + 50 MB carried)
# Tables: python scripts/results_scenes.py scenes_results.tgz --markdown
#
#   TINY=1 PY=.venv/bin/python DATA_DIR=/usr/share/datasets/fashion-mnist SCENES_CACHE=.gpu/scenes-text.safetensors \
#     bash scripts/gpu/scenes_pipeline.sh     # CPU smoke run: both calls in a row, tiny models, a few steps each;
#                                             # the second reads the float16 teacher file as a cold call would
#
# Rows (Tables 1-2 of the paper on scenes): teacher DDIM-32 and DDIM-4; LCM student K = 1, 2, 4; the headline E2E
# recipe (issue #9's `anchored` preset: GAN heads on the frozen feature net + R1, discriminator warm-up (DISC_WARMUP,
# default 200 steps here for the short rows), anchor 10 to the student's own samples, K drawn from {1, 2, 4}, w from
# [1, 2], lr 1e-5, EMA 0.999) for SEEDS (default 0 1 2), each scored at K = 1, 2, 4 (GRID_SEEDS: the same with
# loss.gan_grid=2, rows anchored_grid2_sN; ONLY="NAME ..." runs only those rows); the paper's losses at K = 4 with one sample
# per caption: L1, L2, LPIPS, L2 + LPIPS, L2 + LPIPS + GAN. Every training stage is time-limited (train.max_seconds)
# and resumable from its run folder in $R; training is compiled ($FAST, default CUDA graphs) and falls back to eager
# for the time left when compilation fails. Times (s): AE_SECONDS, TEACHER_SECONDS (default: all that is left before
# DEADLINE), LCM_SECONDS; E2E rows get what is left before DEADLINE minus TAIL_SECONDS (evaluations, copying).
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${DATA_DIR:-${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist}}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
CACHE=${SCENES_CACHE:-$PWD/.gpu/scenes-text.safetensors}
CLS=${CLS:-checkpoints/classifier}; LP=${LP:-checkpoints/lpips_fashion.safetensors}
PYTHON=${PY:-python3}; E="$PYTHON -m e2ediff"
SEEDS=${SEEDS:-0 1 2}
T0=$SECONDS
if [ -n "${TINY:-}" ]; then   # CPU smoke run: tiny models, a few steps, few samples
  R=${R:-runs/scenes-tiny}; N=${EVAL_N:-16}; DEV=cpu; FAST=${FAST:-}; FAST_E2E=${FAST_E2E:-}
  AE_X="model.channels=[8,16,32] model.norm_groups=4 scale_samples=32 train.steps=${AE_STEPS:-3}"
  TEACHER_X="model.hidden_size=32 model.depth=1 model.num_heads=2 train.steps=${TEACHER_STEPS:-3}"
  LCM_X="train.steps=${LCM_STEPS:-3}"; E2E_X="train.steps=${E2E_STEPS:-2}"; DISC_WARMUP=${DISC_WARMUP:-1}   # the anchored rows train the network too
  SMALL="data.num_scenes=128 train.batch_size=8 train.device=cpu"; E2E_BATCH=4
else
  R=${R:-runs/scenes}; N=${EVAL_N:-2000}; DEV=auto; SMALL=""
  FAST=${FAST-train.compile=reduce-overhead}   # CUDA graphs: the small scenes models are launch-bound on a GPU
  FAST_E2E=${FAST_E2E-$FAST${FAST:+ checkpointing=false}}   # CUDA graphs fail with activation checkpointing
  AE_X="train.steps=100000 train.max_seconds=${AE_SECONDS:-70}"
  TEACHER_X="train.steps=200000"   # + train.max_seconds: TEACHER_SECONDS, or what is left before DEADLINE
  LCM_X="train.steps=100000 train.max_seconds=${LCM_SECONDS:-110}"
  E2E_X="train.steps=100000"   # + train.max_seconds: the time left before DEADLINE minus TAIL_SECONDS
  E2E_BATCH=${E2E_BATCH:-32}
fi
COMMON="data.prompt_cache=$CACHE train.progress=false train.log_every=50 $SMALL"
mkdir -p "$R"
[ -f "$CACHE" ] || { echo "scene text cache $CACHE missing (e2ediff encode-prompts --dataset fashion-scenes)" >&2; exit 2; }
stage() { local name=$1; shift; local t0=$SECONDS; echo "=== $name (t=$((SECONDS - T0)) s)"; "$@"; local rc=$?
          echo "=== $name done rc=$rc in $((SECONDS - t0)) s (t=$((SECONDS - T0)) s)"; return $rc; }
fit() {  # fit FAST RUN_DIR SECONDS LOG COMMAND...: a time-limited training command with the FAST overrides (compiled);
         # when that fails, the run resumes eager (train.compile may change on resume) for the time left
  local fast=$1 dir=$2 secs=$3 log=$4; shift 4; local t0=$SECONDS
  local limit=""; [ -n "${TINY:-}" ] || limit="train.max_seconds=$secs"
  "$@" $limit $fast >> "$log" 2>&1 && return 0
  [ -n "$fast" ] || { tail -3 "$log"; return 1; }
  local left=$(( secs - (SECONDS - t0) )); [ $left -gt 20 ] || left=20
  echo "$dir: compiled run failed (see $log); eager for the $left s left" | tee -a "$log"
  [ -n "${TINY:-}" ] || limit="train.max_seconds=$left"
  # the other FAST overrides stay (a resume refuses e.g. another checkpointing); 'no' quoted: YAML reads no as false
  "$@" $limit $(echo "$fast" | sed "s/train\.compile=[^ ]*/train.compile='no'/") >> "$log" 2>&1 || { tail -3 "$log"; return 1; }
}
evaluate() {  # evaluate NAME MODEL K [flags]: one JSON row $R/eval_NAME_kK.json (test split, N scenes)
  local name=$1 model=$2 k=$3; shift 3
  $E evaluate --checkpoint "$model" --classifier "$CLS" --steps "$k" --num-samples "$N" --split test \
    --prompt-cache "$CACHE" --device $DEV "$@" --output "$R/eval_${name}_k${k}.json" 2>&1 | grep -v "^Loading" \
    | sed "s/^/$name k=$k: /"
}
to_out() {  # to_out MODEL NAME: a float16 copy as $OUT/scenes_NAME.safetensors (< 16 MiB)
  [ -n "${OUT:-}" ] && [ -f "$1" ] && $E convert "$1" "$OUT/scenes_$2.safetensors"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
$PYTHON -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

teacher_call() {
  stage autoencoder $E train-autoencoder --preset scenes --run-dir "$R/autoencoder" $COMMON train.checkpoint_every=500 \
    $AE_X > "$R/autoencoder.log" 2>&1 || { tail -3 "$R/autoencoder.log"; exit 1; }
  tail -2 "$R/autoencoder.log"
  local secs=${TEACHER_SECONDS:-$(( ${DEADLINE:-555} - (SECONDS - T0) - 35 ))}
  stage teacher fit "$FAST" "$R/teacher" "$secs" "$R/teacher.log" $E pretrain --preset scenes --run-dir "$R/teacher" $COMMON \
    autoencoder="$R/autoencoder/model.safetensors" train.checkpoint_every=1000 $TEACHER_X || exit 1
  grep -h "time limit\|resumed" "$R/teacher.log"; tail -1 "$R/teacher/metrics.jsonl"
  to_out "$R/teacher/model.safetensors" teacher
  [ -z "${OUT:-}" ] || tar czf "$OUT/scenes_teacher.tgz" "$R"/*.log "$R"/*/metrics.jsonl "$R"/*/config.yaml \
    "$R"/autoencoder/eval.json 2>/dev/null
}

rows_call() {
  local teacher=${TEACHER:-$R/teacher/model.safetensors}
  [ -f "$teacher" ] || teacher=.gpu/scenes_teacher.safetensors
  [ -f "$teacher" ] || { echo "no teacher: $R/teacher/model.safetensors nor .gpu/scenes_teacher.safetensors" >&2; exit 2; }
  echo "teacher: $teacher"
  # While the student trains: the real test crops' classifier features (every evaluation reads them), then the
  # teacher's rows.
  { $PYTHON -c "
from pathlib import Path; from e2ediff.checkpoint import sha256_file; from e2ediff.metrics.classifier import load_classifier
from e2ediff.metrics.scenes import reference_crop_features; from e2ediff.trainer import resolve_device
c = Path('$CLS'); reference_crop_features(load_classifier(c, resolve_device('$DEV')), sha256_file(c / 'model.safetensors')[:16], 'test')
" > "$R/reference.log" 2>&1
    for k in 32 4; do evaluate teacher "$teacher" $k > "$R/eval_teacher_$k.log" & done; wait; } &
  local ref=$!
  stage lcm fit "$FAST" "$R/lcm" "${LCM_SECONDS:-110}" "$R/lcm.log" $E distill --preset scenes --run-dir "$R/lcm" $COMMON \
    teacher="$teacher" train.checkpoint_every=500 $LCM_X || exit 1
  local lcm=$R/lcm/model.safetensors
  wait $ref
  for k in 1 2 4; do evaluate lcm "$lcm" $k > "$R/eval_lcm_$k.log" & done
  local secs=${E2E_SECONDS:-$(( ${DEADLINE:-555} - (SECONDS - T0) - ${TAIL_SECONDS:-95} ))}
  [ "$secs" -gt 30 ] || secs=30
  [ -n "${TINY:-}" ] || echo "E2E rows: $secs s each"
  local one="samples_per_caption=1 train.batch_size=$((E2E_BATCH * 4)) loss.energy=0 optim.lr=${LR:-3e-6}"
  local lp="loss.lpips_weights=$LP"
  local rows=()   # NAME KS PRESET OVERRIDES...: the model is scored at each K of KS
  for s in $SEEDS; do   # the headline: issue #9's best recipe, one model for every K
    rows+=("anchored_s$s 1,2,4 anchored train.seed=$s train.batch_size=$E2E_BATCH disc_warmup=${DISC_WARMUP:-200}")
  done
  for s in ${GRID_SEEDS:-}; do   # the same with the caption projection per cell of a 2 x 2 grid (where, not only what)
    rows+=("anchored_grid2_s$s 1,2,4 anchored train.seed=$s train.batch_size=$E2E_BATCH disc_warmup=${DISC_WARMUP:-200} loss.gan_grid=2")
  done
  rows+=("l1 4 scenes $one loss.l1=1" "l2 4 scenes $one loss.l2=1" "lpips 4 scenes $one loss.lpips=1 $lp"
         "l2lpips 4 scenes $one loss.l2=1 loss.lpips=1 $lp" "l2lpipsgan 4 scenes $one loss.l2=1 loss.lpips=1 $lp loss.gan=0.1")
  for spec in "${rows[@]}"; do
    set -- $spec; local name=$1 ks=$2 preset=$3; shift 3
    [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || continue
    { stage "$name" fit "$FAST_E2E" "$R/$name" "$secs" "$R/$name.log" $E finetune --preset "$preset" --run-dir "$R/$name" \
        $COMMON data.dataset=fashion-scenes data.caption_dropout=0 init="$lcm" train.checkpoint_every=100 "$@" $E2E_X
      [ -f "$R/$name/model.safetensors" ] && for k in ${ks//,/ }; do
        evaluate "$name" "$R/$name/model.safetensors" $k & done; wait; } > "$R/eval_$name.log" 2>&1 &
  done
  wait
  cat "$R"/eval_*.log | grep -v "^===" ; grep -h "=== .* done\|compiled run failed" "$R"/*.log
  echo "total $((SECONDS - T0)) s"
  if [ -n "${OUT:-}" ]; then
    to_out "$lcm" lcm
    for s in ${SHIP:-$(echo $SEEDS | cut -d' ' -f1)}; do to_out "$R/anchored_s$s/model.safetensors" "anchored_s$s"; done
    tar czf "$OUT/scenes_results.tgz" "$R"/eval_*.json "$R"/*.log "$R"/*/metrics.jsonl "$R"/*/config.yaml 2>/dev/null
    ls -la "$OUT"
  fi
}

case "${STAGE:-${TINY:+both}}" in
  teacher) teacher_call ;;
  rows) rows_call ;;
  both)   # TINY: the two calls in a row; the second starts from the float16 teacher file, as a cold call does
    OUT=${OUT:-$R/out}; mkdir -p "$OUT"; teacher_call
    cp "$OUT/scenes_teacher.safetensors" "$R/teacher_f16.safetensors"
    TEACHER=$R/teacher_f16.safetensors rows_call ;;
  *) echo "STAGE=teacher (call 1) or STAGE=rows (call 2); see the header" >&2; exit 2 ;;
esac

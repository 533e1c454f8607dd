#!/usr/bin/env bash
# The `base` pipeline behind docs/results.md's tables, on one GPU, in two resumable chunks of < 10 minutes each.
#
#   STAGE=models bash scripts/gpu/base_pipeline.sh   # autoencoder, then teacher (time-limited; rerun to continue)
#   STAGE=e2e    bash scripts/gpu/base_pipeline.sh   # LCM student, evaluation rows, every E2E row side by side
#   STAGE=sweep  bash scripts/gpu/base_pipeline.sh   # second pass: lr / loss space / LPIPS term per K, on val
#   STAGE=weak   bash scripts/gpu/base_pipeline.sh   # E2E on a briefly distilled (weaker) student
#
# Every training command resumes from its run folder ($R, default runs/gpu-base), so a chunk cut by its time limit is
# continued by running it again. Small models leave an H100 mostly idle, so the E2E rows run as concurrent processes
# on the one GPU; each row has a fixed step budget (ROW_STEPS) and a time limit, and the results table reads the step
# each exported model reached from its file. The `e2e` chunk takes the teacher from $R or, on a fresh
# machine, from $M (base_teacher.safetensors, which holds the autoencoder too). Inputs: .gpu/fashion-mnist (the IDX .gz
# files) and .gpu/cache (the MiniLM prompt cache: `E2EDIFF_CACHE=$PWD/.gpu/cache e2ediff encode-prompts`). With $OUT
# set (the device tool), model files and a log archive are copied there.
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist} E2EDIFF_CACHE=${E2EDIFF_CACHE:-$PWD/.gpu/cache}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/gpu-base}; M=${M:-.gpu/models}; N=${EVAL_N:-10000}
CLS=${CLS:-checkpoints/classifier}; LP=${LP:-checkpoints/lpips_fashion.safetensors}
E="python3 -m e2ediff"
mkdir -p "$R"
stage() { local name=$1; shift; local t0=$SECONDS; echo "=== $name"; "$@"; local rc=$?; echo "=== $name done rc=$rc in $((SECONDS - t0)) s"; }
pick() { if [ -f "$R/$1/model.safetensors" ]; then echo "$R/$1/model.safetensors"; else echo "$M/base_$1.safetensors"; fi; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

evaluate() {  # evaluate NAME MODEL K SPLIT [extra evaluate flags]: one JSON row in $R/eval_NAME_kK_SPLIT.json
  local name=$1 model=$2 k=$3 split=$4; shift 4
  $E evaluate --checkpoint "$model" --classifier "$CLS" --steps "$k" --num-samples "$N" --split "$split" "$@" \
    --output "$R/eval_${name}_k${k}_${split}.json" 2>&1 | grep -v "^Loading" | sed "s/^/$name k=$k $split: /"
}

selected() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }   # ONLY="name ...": run just these rows
throttle() { while [ "$(jobs -rp | wc -l)" -ge "${WAVE:-$1}" ]; do sleep 2; done; }   # at most WAVE (default $1) at once
row() {  # row NAME K INIT STEPS [overrides]: time-limited E2E fine-tune of INIT, then its val and test rows
  local name=$1 k=$2 init=$3 steps=$4; shift 4
  stage "$name" timeout "${ROW_SECONDS:-240}" $E finetune --preset base --run-dir "$R/$name" init="$init" \
    sampler_steps=$k train.steps=$steps train.checkpoint_every=50 train.log_every=10 train.progress=false "$@" \
    > "$R/$name.log" 2>&1
  [ -f "$R/$name/model.safetensors" ] || return 1
  for s in val test; do evaluate "$name" "$R/$name/model.safetensors" "$k" $s; done
}

case "${STAGE:-models}" in
models)
  stage autoencoder timeout "${AE_SECONDS:-210}" $E train-autoencoder --preset base --run-dir "$R/autoencoder" \
    train.steps=${AE_STEPS:-20000} train.checkpoint_every=250 train.progress=false
  stage teacher timeout "${TEACHER_SECONDS:-300}" $E pretrain --preset base --run-dir "$R/teacher" \
    autoencoder="$R/autoencoder/model.safetensors" train.steps=${TEACHER_STEPS:-40000} train.checkpoint_every=250 \
    train.progress=false
  if [ -n "${OUT:-}" ]; then
    cp "$R/autoencoder/model.safetensors" "$OUT/base_autoencoder.safetensors"
    $E convert "$R/teacher/model.safetensors" "$OUT/base_teacher.safetensors"
    tar czf "$OUT/base_models_logs.tgz" "$R"/*/metrics.jsonl "$R"/*/config.yaml 2>/dev/null
  fi
  ;;
e2e)
  TEACHER=$(pick teacher)
  ls -la "$TEACHER" || exit 1
  for k in 32 4; do evaluate teacher "$TEACHER" $k test > "$R/eval_teacher_$k.log" & done
  stage lcm timeout "${LCM_SECONDS:-150}" $E distill --preset base --run-dir "$R/lcm" teacher="$TEACHER" \
    train.steps=${LCM_STEPS:-20000} train.checkpoint_every=250 train.progress=false
  LCM=$R/lcm/model.safetensors
  { for k in 1 2 4; do for s in val test; do evaluate lcm "$LCM" $k $s; done; done
    for seed in 1 2; do evaluate lcm_seed$seed "$LCM" 4 test --seed $seed; done; } > "$R/eval_lcm.log" &
  # Table 1 and Table 2 rows: NAME K overrides. Chains per step are equal across rows: 32 captions × m=4 samples, or
  # 128 captions × 1 sample for the paper's single-sample losses.
  ES="samples_per_caption=4 train.batch_size=${ES_BATCH:-32}"
  ONE="samples_per_caption=1 train.batch_size=$(( ${ES_BATCH:-32} * 4 )) loss.energy=0"
  ROWS=(
    "energy4 4 $ES"
    "energy4_seed1 4 $ES train.seed=1"
    "energy4_seed2 4 $ES train.seed=2"
    "energy2 2 $ES"
    "energy1 1 $ES"
    "l1_4 4 $ONE loss.l1=1"
    "l2_4 4 $ONE loss.l2=1"
    "lpips4 4 $ONE loss.lpips=1 loss.lpips_weights=$LP"
    "l2lpips4 4 $ONE loss.l2=1 loss.lpips=1 loss.lpips_weights=$LP"
    "l2lpipsgan4 4 $ONE loss.l2=1 loss.lpips=1 loss.lpips_weights=$LP loss.gan=0.1"
    "l2lpipsot4 4 $ES loss.energy=0 loss.l2=1 loss.lpips=1 loss.lpips_weights=$LP loss.coupling=minibatch_ot"
    "energypix4 4 $ES loss.space=pixel"
    "energylpips4 4 $ES loss.lpips=1 loss.lpips_weights=$LP"
    "energylpips10_4 4 $ES loss.lpips=10 loss.lpips_weights=$LP"
    "energygan4 4 $ES loss.gan=0.1"
  )
  for spec in "${ROWS[@]}"; do
    set -- $spec; name=$1; k=$2; shift 2
    selected "$name" || continue
    throttle 16
    row "$name" $k "$LCM" ${ROW_STEPS:-300} optim.lr=${LR:-2e-5} "$@" > "$R/eval_$name.log" 2>&1 &
  done
  wait
  cat "$R"/eval_*.log; grep -h "=== .* done" "$R"/*.log
  if [ -n "${OUT:-}" ]; then
    $E convert "$LCM" "$OUT/base_lcm.safetensors"
    for n in ${SHIP:-energy4 energy2}; do   # files back: 64 MiB in all
      [ -f "$R/$n/model.safetensors" ] && $E convert "$R/$n/model.safetensors" "$OUT/base_e2e_$n.safetensors"
    done
    tar czf "$OUT/base_e2e_logs.tgz" "$R"/*.json "$R"/*.log "$R"/*/metrics.jsonl "$R"/*/config.yaml 2>/dev/null
  fi
  ;;
sweep)
  # The second pass, chosen on the validation split: learning rate, loss space and an LPIPS term per K (400 steps; the
  # first sweep's six rows, e{4,2}_lr*, ran 300; 8 rows at a time). LCM from $R/lcm or $M/base_lcm.safetensors.
  LCM=${LCM:-$(pick lcm)}; ls -la "$LCM" || exit 1
  ES="samples_per_caption=4 train.batch_size=32"; LPS="loss.lpips_weights=$LP"
  ROWS=(
    "e4_lr1e-6 4 300 optim.lr=1e-6" "e4_lr3e-6 4 300 optim.lr=3e-6" "e4_lr1e-5 4 300 optim.lr=1e-5"
    "e2_lr1e-6 2 300 optim.lr=1e-6" "e2_lr3e-6 2 300 optim.lr=3e-6" "e2_lr1e-5 2 300 optim.lr=1e-5"
    "e1_lat_lr1e-6 1 400 optim.lr=1e-6"
    "e1_pix_lr1e-6 1 400 loss.space=pixel optim.lr=1e-6" "e1_pix_lr3e-6 1 400 loss.space=pixel optim.lr=3e-6"
    "e1_pix_lr1e-5 1 400 loss.space=pixel optim.lr=1e-5"
    "e1_lpips10_lr1e-6 1 400 optim.lr=1e-6 loss.lpips=10 $LPS"
    "e1_pixlpips10_lr1e-6 1 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=1e-6"
    "e1_pixlpips10_lr1e-6_seed1 1 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=1e-6 train.seed=1"
    "e1_pixlpips10_lr1e-6_seed2 1 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=1e-6 train.seed=2"
    "e1_pixlpips10_lr3e-6 1 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=3e-6"
    "e1_pixlpips10_lr1e-6_800 1 800 loss.space=pixel loss.lpips=10 $LPS optim.lr=1e-6"
    "e2_pix_lr1e-6 2 400 loss.space=pixel optim.lr=1e-6"
    "e2_lpips10_lr1e-6 2 400 optim.lr=1e-6 loss.lpips=10 $LPS"
    "e2_pixlpips10_lr1e-6 2 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=1e-6"
    "e4_pix_lr1e-6 4 400 loss.space=pixel optim.lr=1e-6"
    "e4_lpips10_lr1e-6 4 400 optim.lr=1e-6 loss.lpips=10 $LPS"
    "e4_lpips10_lr1e-6_seed1 4 400 optim.lr=1e-6 loss.lpips=10 $LPS train.seed=1"
    "e4_lpips10_lr1e-6_seed2 4 400 optim.lr=1e-6 loss.lpips=10 $LPS train.seed=2"
    "e4_pixlpips10_lr1e-6 4 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=1e-6"
    "paper_l2lpips4_lr1e-6 4 400 samples_per_caption=1 train.batch_size=128 loss.energy=0 loss.l2=1 loss.lpips=1 $LPS optim.lr=1e-6"
    # third pass (ONLY="long_e4 long_e2 long_e1 e1_pixlpips10_lr3e-6_seed1 e1_pixlpips10_lr3e-6_seed2" ROW_SECONDS=420):
    # longer runs of the best settings, and seeds for the one-step row
    "long_e4 4 1200 optim.lr=1e-6 loss.lpips=10 $LPS" "long_e2 2 1200 optim.lr=1e-6 loss.lpips=10 $LPS"
    "long_e1 1 1500 loss.space=pixel loss.lpips=10 $LPS optim.lr=3e-6"
    "e1_pixlpips10_lr3e-6_seed1 1 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=3e-6 train.seed=1"
    "e1_pixlpips10_lr3e-6_seed2 1 400 loss.space=pixel loss.lpips=10 $LPS optim.lr=3e-6 train.seed=2"
  )
  for spec in "${ROWS[@]}"; do
    set -- $spec; name=$1; k=$2; steps=${ROW_STEPS:-$3}; shift 3
    selected "$name" || continue
    throttle 8
    row "$name" $k "$LCM" $steps $ES "$@" > "$R/eval_$name.log" 2>&1 &
  done
  wait
  cat "$R"/eval_e[124]_*.log "$R"/eval_paper_*.log "$R"/eval_long_*.log 2>/dev/null
  if [ -n "${OUT:-}" ]; then
    for n in ${SHIP:-e4_lpips10_lr1e-6 e2_lpips10_lr1e-6 e1_pixlpips10_lr1e-6}; do
      [ -f "$R/$n/model.safetensors" ] && $E convert "$R/$n/model.safetensors" "$OUT/base_$n.safetensors"
    done
    tar czf "$OUT/base_sweep_logs.tgz" "$R"/eval_*.json "$R"/e[124]_*/metrics.jsonl "$R"/paper_*/metrics.jsonl \
      "$R"/long_*/metrics.jsonl 2>/dev/null
  fi
  ;;
weak)
  # Does E2E pay off where the student has room? A student distilled for only WEAK_STEPS steps from the same teacher,
  # then the best K = 2 / K = 4 E2E settings of the sweeps on it (TEACHER from $R/teacher or $M/base_teacher.safetensors).
  TEACHER=${TEACHER:-$(pick teacher)}; ls -la "$TEACHER" || exit 1
  stage weak_lcm timeout 120 $E distill --preset base --run-dir "$R/weak_lcm" teacher="$TEACHER" \
    train.steps=${WEAK_STEPS:-400} train.checkpoint_every=100 train.progress=false
  WEAK=$R/weak_lcm/model.safetensors
  { for k in 1 2 4; do for s in val test; do evaluate weak_lcm "$WEAK" $k $s; done; done; } > "$R/eval_weak_lcm.log" &
  LPS="loss.lpips_weights=$LP"
  for spec in "weak_e4_lr1e-6 4 optim.lr=1e-6" "weak_e4_lr3e-6 4 optim.lr=3e-6" "weak_e2_lr1e-6 2 optim.lr=1e-6" \
              "weak_e2_lr3e-6 2 optim.lr=3e-6"; do
    set -- $spec; name=$1; k=$2; shift 2
    row "$name" $k "$WEAK" 400 samples_per_caption=4 train.batch_size=32 loss.lpips=10 $LPS "$@" \
      > "$R/eval_$name.log" 2>&1 &
  done
  wait
  cat "$R"/eval_weak_*.log
  [ -n "${OUT:-}" ] && tar czf "$OUT/base_weak_logs.tgz" "$R"/eval_weak_*.json "$R"/weak_*/metrics.jsonl 2>/dev/null
  ;;
*) echo "STAGE must be models, e2e, sweep or weak, not '${STAGE}'" >&2; exit 2 ;;
esac

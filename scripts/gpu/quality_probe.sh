#!/usr/bin/env bash
# Issue #9 on one GPU: the speed benchmark, then E2E recipe rows against the shipped `base` student, side by side.
#
#   STAGE=bench bash scripts/gpu/quality_probe.sh      # benchmarks/e2e_speed.py: old code vs today's variants
#   STAGE=probe bash scripts/gpu/quality_probe.sh      # round 1: recipe rows (concurrent) + the student, validation split
#   STAGE=gan   bash scripts/gpu/quality_probe.sh      # round 2: the adversarial rows (FAST=... compiles them)
#   STAGE=all   bash scripts/gpu/quality_probe.sh      # bench, then round 1
#   STAGE=warm  bash scripts/gpu/quality_probe.sh      # round 3: discriminator warm-up, longer runs, slow EMA, anchor
#   STAGE=anchor bash scripts/gpu/quality_probe.sh     # round 4: the anchored recipe x 3 seeds (val + test), neighbours
#   STAGE=long  bash scripts/gpu/quality_probe.sh      # round 5: anchored x 3 seeds run longer, + energy score
#   STAGE=decay bash scripts/gpu/quality_probe.sh      # round 6: anchor decaying to 0 (collapses once it is 0);
#                                                      #   K = 2 models (base/e2e_2step); 3 seeds each
#   STAGE=group bash scripts/gpu/quality_probe.sh      # round 7: the shipped models trained on (re-anchored), and
#                                                      #   the minibatch-std discriminator (loss.gan_group_std)
#   STAGE=spread bash scripts/gpu/quality_probe.sh     # round 8: a third stage + the energy distance (real bank)
#   STAGE=teacher bash scripts/gpu/quality_probe.sh    # round 9: the anchor to the guided teacher in the student's
#                                                      #   sampler (`--preset teacher-anchored`; see its block);
#                                                      #   round 11: TEACHER_SWEEP, and the target's guidance
#                                                      #   interval per row (X_TAG; docs/results.md has the command)
#   STAGE=refresh bash scripts/gpu/quality_probe.sh    # the anchor refreshed to the EMA every REFRESH steps (not run
#                                                      #   on a GPU yet: built and tested in the sixth session)
#   STAGE=confirm SPLIT=test EVAL_N=10000 STEPS=800 ... # `adversarial` x 3 seeds, with and without K = 1
#
# Inputs (ignored by git, carried to the GPU machine): .gpu/fashion-mnist (the IDX .gz files), .gpu/cache (the MiniLM
# prompt cache: `E2EDIFF_CACHE=$PWD/.gpu/cache e2ediff encode-prompts`), .gpu/old/src (the code before, for the
# benchmark: `git archive 0ae16b9 src | tar -x -C .gpu/old`). Every result is copied to $OUT as soon as it exists, so
# a call cut short still returns what finished. Rows train for ROW_SECONDS each (time-limited, all at once: a 5M model
# leaves the card idle), then each row's exported model is scored at K = 1, 2, 4 on EVAL_N validation samples.
# A device call carries at most 64 MiB: the tracked tree (~55 MiB) plus .gpu (~32 MiB) is too much, so move the files
# the call does not read (checkpoints/base/e2e*.safetensors, checkpoints/base/autoencoder.safetensors) out of the
# working tree for the call and back after it, and carry .gpu:
#   run(command="STAGE=all ROW_SECONDS=300 EVAL_N=5000 bash scripts/gpu/quality_probe.sh", carry=[".gpu"])
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist} E2EDIFF_CACHE=${E2EDIFF_CACHE:-$PWD/.gpu/cache}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=${R:-runs/gpu-quality}; N=${EVAL_N:-5000}; OUT=${OUT:-$R/out}; DEV=${DEV:-cuda}
CLS=checkpoints/classifier; LP=checkpoints/lpips_fashion.safetensors; LCM=checkpoints/base/lcm.safetensors
E="python3 -m e2ediff"
mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
save() {  # an evaluation's log is kept only when it has no JSON (a failure): a finished one repeats its JSON's line
  local logs=() f
  for f in "$R"/*.log; do [[ $f == */eval_*.log && -f ${f%.log}.json ]] || logs+=("$f"); done
  tar czf "$OUT/quality_rows.tgz" "$R"/*.json "${logs[@]}" "$R"/*/metrics.jsonl "$R"/*/config.yaml 2>/dev/null; }

SPLIT=${SPLIT:-val}   # choose on val; STAGE=confirm reports on test
evaluate() {  # evaluate NAME MODEL K [W [GAMMA]]: one JSON row in $R/eval_NAME_kK_$SPLIT.json (W default 1.5, GAMMA
  # default the model file's renoise_gamma)
  $E evaluate --checkpoint "$2" --classifier "$CLS" --steps "$3" --num-samples "$N" --split "$SPLIT" --device "$DEV" \
    --w "${4:-1.5}" ${5:+--gamma "$5"} --output "$R/eval_$1_k$3_$SPLIT.json" > "$R/eval_$1_k$3_$SPLIT.log" 2>&1
}
row() {  # row NAME [overrides]: time-limited E2E fine-tune of the student, then its K = 1, 2, 4 validation rows
  local name=$1; shift
  [[ -n "${SKIP:-}" && "$name" =~ $SKIP ]] && return 1   # SKIP: a regex of rows to leave as they are
  local secs=${ROW_SECONDS:-150}   # train.max_seconds stops cleanly and exports; timeout only guards a hang
  local t0=$SECONDS
  train() { timeout $(($1 + 120)) $E finetune --preset "${PRESET:-base}" --run-dir "$R/$name" init="${INIT:-$LCM}" \
    train.steps="${STEPS:-100000}" \
    train.max_seconds="$1" train.batch_size=32 samples_per_caption=4 train.checkpoint_every=50 train.log_every=10 \
    train.progress=false train.device="$DEV" "${@:2}" >> "$R/$name.log" 2>&1; }
  # FAST (e.g. "train.compile=reduce-overhead checkpointing=false": CUDA graphs, 5x on an idle H100); a row whose
  # compiled run fails before exporting goes on eager for the time left
  train "$secs" $FAST "$@" || [ -f "$R/$name/model.safetensors" ] || [ -z "$FAST" ] || {
    echo "$name: compiled run failed; eager for the rest" >> "$R/$name.log"; rm -rf "$R/$name"
    train $(( secs - (SECONDS - t0) > 30 ? secs - (SECONDS - t0) : 30 )) "$@"; }
  [ -f "$R/$name/model.safetensors" ] || { echo "$name: no model"; return 1; }
  for k in ${ROW_KS-1 2 4}; do evaluate "$name" "$R/$name/model.safetensors" $k; done
  local step; step=$(python3 -c "import sys; from e2ediff.checkpoint import read_model_meta as r
print(r(sys.argv[1]).get('step'))" "$R/$name/model.safetensors")
  echo "$name done: step $step"
  save
}
student() {  # the reference row, scored like every other row in the same run (a call without the file skips it)
  [ -f "$LCM" ] || { echo "student: $LCM not here; not scored in this call"; return 0; }
  for k in 1 2 4; do [ -f "$R/eval_student_k${k}_$SPLIT.json" ] || evaluate student "$LCM" $k; done
  echo "student done"; save
}
FAST=${FAST:-}
# rounds 5-6: exports kept every CKPT steps for the step-by-step validation rows; LONG_X: extra overrides (smoke runs)
KEEP="loss.lpips_weights=$LP train.keep_exports=true train.checkpoint_every=${CKPT:-450} ${LONG_X:-}"
F="loss.lpips_weights=$LP"
MIX="sampler_steps_mix=[1,2,4] train.keep_exports=true"     # rows of rounds 1-2: K drawn per step, exports kept

# rounds 6-7, FINAL=1: each row's exports at multiples of EVAL_EVERY past SNAP_MIN and its last model are scored on
# val; the export with the best val (sum of its K = 2 and 4 FD ratios; K = 2 alone for k2* rows, K = 4 alone for k4*
# rows) is scored on test at TEST_KS (default K = 1, 2, 4; TEST_N samples). Round 15: EVAL_DIALS, the sampling dials
# each export is scored at on val, as W or W/GAMMA items (default "1.5": w = 1.5 at the file's own renoise_gamma); a
# dial other than that default names the export NAME@STEPwW[gGAMMA], and the choice on val picks the dial too.
EVERY=${EVAL_EVERY:-900}
export_path() {  # NAME@STEP[dial]'s file
  local s=${1#*@}; s=${s%%[wg]*}; echo "$R/${1%@*}/exports/model_step_$(printf %08d "$s").safetensors"; }
row_ks() { case $1 in k2*) echo 2 ;; k4*) echo 4 ;; *) echo 2 4 ;; esac; }   # the Ks a row is chosen by
# results_probe.py's choice on val: BAR set, the fewest missed bar conditions first; BAR=margin (round 16), among
# those the widest margin to the bar instead of the lowest FD (round 15: a val pick 0.002 inside the diversity window
# fell under it on test)
bar_flags() { [ -z "${BAR:-}" ] || echo --bar; [ "${BAR:-}" != margin ] || echo --margin; }
row_dials() {  # the dials a row's exports are scored at: EVAL_DIALS, or EVAL_DIALS_K2 / EVAL_DIALS_K4 for k2 / k4 rows
  local d=${EVAL_DIALS:-1.5}
  case $1 in k2*) d=${EVAL_DIALS_K2:-$d} ;; k4*) d=${EVAL_DIALS_K4:-$d} ;; esac; echo "$d"; }
final() {  # final NAME: val snapshots at each dial, the best (export, dial) by val, that on test
  local f step best last dial tag w g
  [ -n "${FINAL:-}" ] && [ -f "$R/$1/model.safetensors" ] || return 0
  [[ -n "${SKIP:-}" && "$1" =~ $SKIP ]] && return 0
  last=$(ls "$R/$1"/exports/model_step_*.safetensors | tail -1)
  for f in "$R/$1"/exports/model_step_*.safetensors; do
    step=${f##*_step_}; step=$((10#${step%.safetensors}))
    { [ $((step % EVERY)) -eq 0 ] && [ "$step" -gt "${SNAP_MIN:-1000}" ]; } || [ "$f" = "$last" ] || continue
    for dial in $(row_dials "$1"); do
      w=${dial%/*}; g=; [[ $dial == */* ]] && g=${dial#*/}
      tag=; [[ $w == 1.5 && -z $g ]] || tag=w$w${g:+g$g}   # the default dial keeps the plain NAME@STEP
      for k in $(row_ks "$1"); do
        [ -f "$R/eval_$1@${step}${tag}_k${k}_val.json" ] || evaluate "$1@$step$tag" "$f" $k "$w" $g
      done
    done
  done
  best=$(python3 scripts/results_probe.py "$R" --best "$1" $(bar_flags))
  [ -n "$best" ] || return 0
  echo "$1: best on val $best"; local path; path=$(export_path "$best")
  tag=${best#*@}; tag=${tag#"${tag%%[wg]*}"}; w=1.5; g=
  [[ $tag =~ w([0-9.]+) ]] && w=${BASH_REMATCH[1]}; [[ $tag =~ g([0-9.]+) ]] && g=${BASH_REMATCH[1]}
  local ks="1 2 4"; [[ $1 == k[24]* ]] && ks=$(row_ks "$1")   # a one-K model is scored on test at its K
  for k in ${TEST_KS:-$ks}; do
    [ -f "$R/eval_${best}_k${k}_test.json" ] || SPLIT=test N=${TEST_N:-10000} evaluate "$best" "$path" $k "$w" $g
  done
}
final_student() { [ -z "${FINAL:-}" ] || [ ! -f "$LCM" ] ||
  for k in 1 2 4; do [ -f "$R/eval_student_k${k}_test.json" ] || SPLIT=test N=${TEST_N:-10000} evaluate student "$LCM" $k; done; }
fp16_best() {  # float16 copies of the best export of each family (by val) to $OUT, sharing the base autoencoder
  # copied there once (10.8 MB a file instead of 15.8: $OUT brings back at most 8 files and 64 MiB)
  [ -n "${FINAL:-}" ] && [ -n "${OUT:-}" ] || return 0
  cp checkpoints/base/autoencoder.safetensors "$OUT/"
  # FP16_ROWS=1: the best export of each row instead of each family (3 seeds of one recipe: FP16_MAX=2 brings 4)
  local pick=--best-per-family; [ -z "${FP16_ROWS:-}" ] || pick=--best
  python3 scripts/results_probe.py "$R" $pick $(bar_flags) |   # best first; at most FP16_MAX (2) of
    awk -v n="${FP16_MAX:-2}" '{ f = ($0 ~ /^k2/); if (c[f]++ < n) print }' |   # the k2 and of the other families
    while read -r best; do [ -z "$best" ] || { echo "fp16 copy: $best"; $E convert "$(export_path "$best")" \
      "$OUT/q_${best%@*}.safetensors" --share-autoencoder "$OUT/autoencoder.safetensors"; }; done
}

if [[ "${STAGE:-all}" == bench || "${STAGE:-all}" == all ]]; then
  python3 benchmarks/e2e_speed.py --old-src .gpu/old/src --device cuda --warmup "${BENCH_WARMUP:-15}" \
    --iters "${BENCH_ITERS:-60}" --timeout 150 --output "$OUT/e2e_speed.json"
fi
if [[ "${STAGE:-all}" == probe || "${STAGE:-all}" == all ]]; then
  # w=1.0 rows train at the unguided input (the CPU probes: less drift) and, like every row, are sampled at w = 1.5
  student &
  row fscore_w1_lr1e-6 loss.space=features $F $MIX w=1.0 optim.lr=1e-6 &
  row fbank_w1_lr1e-6 loss.space=features loss.real_bank=16 $F $MIX w=1.0 optim.lr=1e-6 &
  row fbank_w1_lr3e-6 loss.space=features loss.real_bank=16 $F $MIX w=1.0 optim.lr=3e-6 &
  # the adversarial term as DMD2 / ADD do it: hinge heads on the frozen feature network, R1, energy as the regulariser
  row fbank_gan0.1_w1_lr1e-6 loss.space=features loss.real_bank=16 loss.gan=0.1 loss.gan_space=features loss.r1=1.0 \
    $F $MIX w=1.0 optim.lr=1e-6 &
  row fbank_gan1_w1_lr1e-6 loss.space=features loss.real_bank=16 loss.gan=1.0 loss.gan_space=features loss.r1=1.0 \
    $F $MIX w=1.0 optim.lr=1e-6 &
  row lscore_w1_lr1e-6 $MIX w=1.0 optim.lr=1e-6 &
  row distribution_preset_lr1e-6 loss.space=features loss.real_bank=16 $F $MIX w_range=[1.0,2.0] optim.lr=1e-6 &
  row distribution_gan0.5_lr1e-6 loss.space=features loss.real_bank=16 loss.gan=0.5 loss.gan_space=features \
    loss.r1=1.0 $F $MIX w_range=[1.0,2.0] optim.lr=1e-6 &
  wait
fi
if [[ "${STAGE:-all}" == gan ]]; then   # round 2: the adversarial term leads (round 1: energy rows over-disperse)
  G="loss.gan_space=features loss.r1=1.0 $F $MIX"; GO="loss.energy=0 loss.gan=1.0 $G"   # GO: GAN alone
  student &
  row gan_only_lr1e-6 $GO optim.lr=1e-6 &                  # w: the student's own 1.5
  row gan_only_lr3e-6 $GO optim.lr=3e-6 &
  row gan_only_lr1e-5 $GO optim.lr=1e-5 &
  row gan_only_w1_lr1e-6 $GO w=1.0 optim.lr=1e-6 &
  row gan_only_wrange_lr1e-6 $GO w_range=[1.0,2.0] optim.lr=1e-6 &
  row gan_only_r1_0.1_lr1e-6 loss.energy=0 loss.gan=1.0 $G loss.r1=0.1 optim.lr=1e-6 &
  row gan1_fbank_lr1e-6 loss.space=features loss.real_bank=16 loss.gan=1.0 $G optim.lr=1e-6 &
  row gan3_fbank_lr1e-6 loss.space=features loss.real_bank=16 loss.gan=3.0 $G optim.lr=1e-6 &
  wait
fi
if [[ "${STAGE:-all}" == warm ]]; then   # round 3: a calibrated discriminator first, then longer runs and a slow EMA
  # Round 2's logs: the fresh heads start at logits near -20 and need ~600 steps to calibrate, i.e. the whole 800-step
  # run took its GAN gradients from an uncalibrated discriminator. disc_warmup trains the heads alone first.
  # FAST="train.compile=reduce-overhead checkpointing=false" STAGE=warm ROW_SECONDS=400 bash scripts/gpu/quality_probe.sh
  A="loss.lpips_weights=$LP train.keep_exports=false"; W="disc_warmup=${WARMUP:-500}"; S="train.ema_decay=0.999"
  student &
  PRESET=adversarial row adv_lr1e-6 $A &                                  # the shipped recipe, run longer
  PRESET=adversarial row adv_warm_lr1e-6 $A $W &
  PRESET=adversarial row adv_warm_lr3e-6_ema999 $A $W $S optim.lr=3e-6 &
  PRESET=adversarial row adv_warm_lr1e-5_ema999 $A $W $S optim.lr=1e-5 &
  PRESET=adversarial row adv_warm_lr3e-6_ema999_anchor1 $A $W $S optim.lr=3e-6 loss.anchor=1.0 &
  PRESET=adversarial row adv_warm_lr1e-5_ema999_anchor10 $A $W $S optim.lr=1e-5 loss.anchor=10.0 &
  PRESET=adversarial row adv_warm_lr3e-6_ema999_k24 $A $W $S optim.lr=3e-6 sampler_steps_mix=[2,4] &
  PRESET=adversarial row adv_warm_lr3e-6_ema99 $A $W train.ema_decay=0.99 optim.lr=3e-6 &
  wait
fi
if [[ "${STAGE:-all}" == anchor ]]; then   # round 4: round 3's winner (anchor 10, lr 1e-5) x 3 seeds, scored on val
  # AND test; five neighbours on val; the best seed and the two best neighbours come back as float16 files.
  # FAST="train.compile=reduce-overhead checkpointing=false" STAGE=anchor ROW_SECONDS=400 bash scripts/gpu/quality_probe.sh
  A="loss.lpips_weights=$LP train.keep_exports=false disc_warmup=${WARMUP:-500} train.ema_decay=0.999"
  student &
  for seed in 0 1 2; do
    (PRESET=adversarial row a10_lr1e-5_seed$seed $A optim.lr=1e-5 loss.anchor=10.0 train.seed=$seed &&
     for k in 1 2 4; do SPLIT=test N=${TEST_N:-10000} \
       evaluate a10_lr1e-5_seed$seed "$R/a10_lr1e-5_seed$seed/model.safetensors" $k; done; save) &
  done
  PRESET=adversarial row a10_lr3e-5 $A optim.lr=3e-5 loss.anchor=10.0 &
  PRESET=adversarial row a30_lr1e-5 $A optim.lr=1e-5 loss.anchor=30.0 &
  PRESET=adversarial row a30_lr3e-5 $A optim.lr=3e-5 loss.anchor=30.0 &
  PRESET=adversarial row a3_lr1e-5 $A optim.lr=1e-5 loss.anchor=3.0 &
  PRESET=adversarial row a100_lr3e-5 $A optim.lr=3e-5 loss.anchor=100.0 &
  wait
  if [ -n "${OUT:-}" ]; then   # float16 copies (the device returns files <= 16 MiB): best seed, two best neighbours
    python3 - "$R" <<'PY' | while read -r name; do $E convert "$R/$name/model.safetensors" "$OUT/q_$name.safetensors"; done
import json, sys
from pathlib import Path
R = Path(sys.argv[1]); fd = lambda n, k: json.loads((R / f"eval_{n}_k{k}_val.json").read_text())["fd"]
def score(n):
    try: return sum(fd(n, k) / fd("student", k) for k in (2, 4))
    except (OSError, KeyError, ValueError): return float("inf")
seeds = sorted((f"a10_lr1e-5_seed{s}" for s in range(3)), key=score)
others = sorted(["a10_lr3e-5", "a30_lr1e-5", "a30_lr3e-5", "a3_lr1e-5", "a100_lr3e-5"], key=score)
print("\n".join([seeds[0]] + others[:2]))
PY
  fi
fi
if [[ "${STAGE:-all}" == long ]]; then   # round 5: the anchored recipe run longer (is the gain still rising?), and
  # an energy-score term against a real bank on top of it (round 4: every anchored row keeps the student's diversity,
  # 0.83; the energy score spreads samples). Exports every CKPT steps; each seed's exports at multiples of EVAL_EVERY
  # and its last model are scored on val (the exports at K = 2, 4; the last model at 1, 2, 4), the last model
  # also on test (TEST_N). A warm machine's rerun
  # with a larger ROW_SECONDS resumes every row (train.max_seconds counts from the resume).
  # FAST="train.compile=reduce-overhead checkpointing=false" STAGE=long ROW_SECONDS=400 bash scripts/gpu/quality_probe.sh
  EVERY=${EVAL_EVERY:-450}
  A=$KEEP
  B="loss.space=features loss.real_bank=16"
  snapshots() {  # snapshots NAME: val rows at K = 2, 4 of the exports at multiples of EVERY past the warm-up (500)
    local f step
    for f in "$R/$1"/exports/model_step_*.safetensors; do
      [ -f "$f" ] || continue; step=${f##*_step_}; step=$((10#${step%.safetensors}))
      [ $((step % EVERY)) -eq 0 ] && [ "$step" -gt "${SNAP_MIN:-500}" ] || continue
      for k in 2 4; do evaluate "$1@$step" "$f" $k; done
    done
  }
  student &
  for seed in 0 1 2; do
    (PRESET=anchored row long_s$seed $A train.seed=$seed; [ -f "$R/long_s$seed/model.safetensors" ] && { snapshots long_s$seed & for k in 1 2 4; do
       SPLIT=test N=${TEST_N:-10000} evaluate long_s$seed "$R/long_s$seed/model.safetensors" $k; done; wait; }
     save) &
  done
  if [ -z "${SEEDS_ONLY:-}" ]; then   # SEEDS_ONLY=1: a resume of the three seeds alone
    PRESET=anchored row long_es0.1 $A $B loss.energy=0.1 &
    PRESET=anchored row long_es1 $A $B loss.energy=1.0 &
  fi
  wait
  if [ -n "${OUT:-}" ]; then   # float16 copies of the three seeds' last models (the device returns files <= 16 MiB)
    for seed in 0 1 2; do [ -f "$R/long_s$seed/model.safetensors" ] &&
      $E convert "$R/long_s$seed/model.safetensors" "$OUT/q_long_s$seed.safetensors"; done
  fi
fi
if [[ "${STAGE:-all}" == decay ]]; then   # round 6: two levers on top of the anchored recipe, 3 seeds each.
  # decay_s*: λ_anchor 10 falls linearly to 0 over DECAY network steps (round 5: diversity stays at the student's
  # 0.83 under λ 10 while FD still improves at 3,000 steps). k2_s*: a K = 2 model (K fixed at 2, as the paper trains
  # one model per K; round 5's K-mix rows stop at 0.84x at K = 2). plain_s0: the anchored recipe for the same time.
  # On a card with > 100 GB two more rows: the energy score against the real bank on top of the decaying anchor, and
  # a decaying K = 2 model. Two chunks on one warm machine (the second resumes every row, evaluates and tests):
  #   FAST="train.compile=reduce-overhead checkpointing=false" STAGE=decay ROW_SECONDS=440 ROW_KS="2 4" ...
  #   FAST=... STAGE=decay ROW_SECONDS=300 ROW_KS= FINAL=1 ...   (ROW_KS empty: the last model is scored as an export)
  # FINAL=1: each row's exports at multiples of EVAL_EVERY past SNAP_MIN and its last model are scored on val; the
  # export with the best val (sum of its K = 2 and 4 FD ratios; K = 2 alone for k2 rows) is scored on test at K = 1,
  # 2, 4 (TEST_N) and, the best of each family, copied to $OUT in float16.
  A=$KEEP; D="loss.anchor_decay=${DECAY:-2500}"; K2="sampler_steps=2 sampler_steps_mix=null"
  B="loss.space=features loss.real_bank=16 loss.energy=1.0"
  (student; final_student) &
  for seed in 0 1 2; do
    (PRESET=anchored row decay_s$seed $A $D train.seed=$seed; final decay_s$seed; save) &
    (PRESET=anchored row k2_s$seed $A $K2 train.seed=$seed; final k2_s$seed; save) &
  done
  (PRESET=anchored row plain_s0 $A train.seed=0; final plain_s0; save) &
  if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 || echo 0)" -gt 100000 ] 2>/dev/null ||
     [ -n "${ALL_ROWS:-}" ]; then
    (PRESET=anchored row decay_es1_s0 $A $D $B train.seed=0; final decay_es1_s0; save) &
    (PRESET=anchored row k2_decay_s0 $A $K2 $D train.seed=0; final k2_decay_s0; save) &
  fi
  wait
  fp16_best
fi
if [[ "${STAGE:-all}" == group ]]; then   # round 7: the shipped models trained on, 3 seeds each, and the
  # minibatch-std discriminator on top (round 6: diversity stays at 0.83-0.85 under every lever; no per-sample
  # discriminator can see a caption's spread). Every row starts from a shipped model and is anchored to it:
  # k2c_s*: `anchored-2step` from base/e2e_2step; mixc_s*: `anchored` (K from {1, 2, 4}) from base/e2e;
  # k2g_s0 / mixg_s0: the same with loss.gan_group_std=true. The student is scored when its file is here (a first
  # call that cannot carry it leaves it to the next). Chunks on one warm machine resume every row:
  #   FAST="train.compile=reduce-overhead checkpointing=false" STAGE=group ROW_SECONDS=400 ROW_KS= FINAL=1 ...
  A=$KEEP; G="loss.gan_group_std=true"
  (student; final_student) &
  for seed in 0 1 2; do
    (PRESET=anchored-2step INIT=checkpoints/base/e2e_2step.safetensors row k2c_s$seed $A train.seed=$seed
     final k2c_s$seed; save) &
    (PRESET=anchored INIT=checkpoints/base/e2e.safetensors row mixc_s$seed $A train.seed=$seed; final mixc_s$seed
     save) &
  done
  (PRESET=anchored-2step INIT=checkpoints/base/e2e_2step.safetensors row k2g_s0 $A $G train.seed=0; final k2g_s0
   save) &
  (PRESET=anchored INIT=checkpoints/base/e2e.safetensors row mixg_s0 $A $G train.seed=0; final mixg_s0; save) &
  wait
  fp16_best
fi
if [[ "${STAGE:-all}" == spread ]]; then   # round 8: a third stage from the shipped files (anchored to them, as in
  # round 7) with the energy distance against a real bank in the feature space pulling diversity up (rounds 5-7:
  # diversity 0.83-0.87 under the anchor, λ 10; an energy term of λ_ES <= 1 did not move it in round 5, so the
  # default rows sweep λ_ES 3-100 for the scale at which it does). SPREAD_ROWS: FAMILY:λ_ES:SEED, FAMILY one of mix
  # (`anchored` from base/e2e), k2 (`anchored-2step` from base/e2e_2step), mixg / k2g (the same + gan_group_std).
  # Exports are chosen on val by the bar first (BAR=1: fewest missed conditions, then FD), then scored on test.
  #   FAST="train.compile=reduce-overhead checkpointing=false" STAGE=spread ROW_SECONDS=400 ROW_KS= FINAL=1 ...
  A=$KEEP; B="loss.space=features loss.real_bank=16"; BAR=${BAR-1}
  (student; final_student) &
  for spec in ${SPREAD_ROWS:-mix:3:0 mix:10:0 mix:30:0 mix:100:0 k2:3:0 k2:10:0 k2:30:0 k2:100:0}; do
    IFS=: read -r fam es seed <<< "$spec"
    name=${fam}e${es}_s$seed; x=""
    [[ $fam == *g ]] && x="loss.gan_group_std=true"
    if [[ $fam == k2* ]]; then preset=anchored-2step init=checkpoints/base/e2e_2step.safetensors
    else preset=anchored init=checkpoints/base/e2e.safetensors; fi
    (PRESET=$preset INIT=$init row "$name" $A $B loss.energy="$es" $x train.seed="$seed"; final "$name"; save) &
  done
  wait
  fp16_best
fi
if [[ "${STAGE:-all}" == teacher ]]; then   # round 9: the anchor's target is the guided 32-step teacher's ODE endpoint
  # from the chain's own noise (loss.anchor_to=teacher; DMD2's regression loss), not the starting model's sample.
  # Round 8: the teacher at w = 1.5 (test FD 1.03, alignment 0.938) is better than every few-step model. TEACHER_ROWS:
  # FAMILY:TEACHER_STEPS:λ:SEED[:CHAINS], FAMILY mix (`anchored` from base/e2e) or k2 (`anchored-2step`, from
  # K2_INIT). Round 9 (this session's shipped base/e2e): mix:16:10:{0,1,2}, 900 steps, see docs/results.md; the
  # recipe is `--preset teacher-anchored`. TEACHER: the base teacher, not shipped
  # and ignored by git; made beside the shipped autoencoder so that it shares it (10.8 MB instead of 15.6):
  #   git show 0ae16b9:checkpoints/base/teacher.safetensors > /tmp/teacher.safetensors
  #   e2ediff convert /tmp/teacher.safetensors checkpoints/base/teacher.safetensors \
  #     --share-autoencoder checkpoints/base/autoencoder.safetensors
  # First call (measured 2026-12-06): the tree without base/lcm, base/e2e_1step, base/e2e_2step, docs/results and
  # docs/figures (~20 MB) + carry=["checkpoints/base/teacher.safetensors", ".gpu/fashion-mnist", ".gpu/cache-p"]
  # (43 MB) fits 64 MiB (63.6 MB in all); round 9's second call, which made base/e2e, added .gpu/student-r8:
  #   STUDENT_EVALS=.gpu/student-r8 FAST="train.compile=reduce-overhead checkpointing=false" STAGE=teacher \
  #     TEACHER_ROWS="mix:16:10:0 mix:16:10:1 mix:16:10:2" ROW_SECONDS=320 ROW_KS= FINAL=1 EVAL_EVERY=450 \
  #     SNAP_MIN=500 EVAL_N=5000 LONG_X="disc_warmup=250" bash scripts/gpu/quality_probe.sh
  # K2_INIT: the k2 rows' starting file (default base/e2e). To start them from base/e2e_2step, that call keeps
  # e2e_2step in the tree and moves e2e out (the 64 MiB fit the same) and runs only k2 rows. Round 10 (the shipped
  # base/e2e_2step, docs/results/gpu-2026-12-06/quality-round10): K2_INIT=checkpoints/base/e2e_2step.safetensors
  # TEACHER_ROWS="k2:16:10:0 k2:16:10:1 k2:16:10:2" ROW_SECONDS=380 SNAP_MIN=400, the rest as above; without the
  # reference .npz files of .gpu/cache-p (the evaluator remakes them) to fit 64 MiB. STUDENT_EVALS: a folder
  # of the student's eval_student_k*_{val,test}.json (a call without base/lcm: rounds 7-8's rows agree to 1e-10),
  # copied into $R so that the val choice by the bar has its reference.
  A=$KEEP; T=${TEACHER:-checkpoints/base/teacher.safetensors}; BAR=${BAR-1}
  [ -z "${STUDENT_EVALS:-}" ] || cp -n "$STUDENT_EVALS"/eval_student_k*.json "$R"/
  [ -f "$T" ] || { echo "teacher: $T not here" >&2; exit 2; }
  for g in ${TEACHER_EVAL_STEPS:-}; do   # the teacher's own DDIM-g sample at w = 1.5 (its target quality), K = 4 slot
    [ -f "$R/eval_teacher_ddim${g}_k4_$SPLIT.json" ] || $E evaluate --checkpoint "$T" --classifier "$CLS" \
      --sampler ddim --steps "$g" --guidance 1.5 --num-samples "$N" --split "$SPLIT" --device "$DEV" \
      --output "$R/eval_teacher_ddim${g}_k4_$SPLIT.json" > "$R/eval_teacher_ddim${g}.log" 2>&1 &
  done
  # TEACHER_SWEEP: the teacher's own DDIM-16 sample at guidance W, applied only at timesteps LO..HI (Kynkäänniemi et
  # al. 2024), as "W:LO,HI" items: the target quality of loss.teacher_guidance_interval (round 11)
  for item in ${TEACHER_SWEEP:-}; do
    IFS=: read -r gw gi <<< "$item"; out=$R/eval_teacher16_w${gw}_i${gi/,/-}_k4_$SPLIT   # its log: kept on failure only
    [ -f "$out.json" ] || $E evaluate --checkpoint "$T" --classifier "$CLS" --sampler ddim --steps 16 \
      --guidance "$gw" --guidance-interval "$gi" --num-samples "$N" --split "$SPLIT" --device "$DEV" \
      --output "$out.json" > "$out.log" 2>&1
  done &
  (student; final_student) &
  # The target is the teacher in the student's sampler with the chain's re-noise draws (loss.teacher_renoise; the
  # CPU probe of 2026-12-06: the plain ODE endpoint made K = 2 / 4 2.7x / 2.6x worse in 100 steps, the re-noised
  # target took K = 2 to 0.87x with alignment +0.017); a FAMILY ending in p (mixp, k2p) uses the plain endpoint.
  # A spec's fifth field: loss.anchor_samples (the teacher's target on that many of each caption's m = 4 chains;
  # default 1: by call count the teacher's guided solves cost several student steps with all 4).
  # A spec's sixth field TAG (round 11) adds the overrides in the variable X_TAG and names the row ...a${λ}TAG_s${seed},
  # e.g. TEACHER_ROWS="k2:16:10:0:1:i600" X_i600="loss.teacher_guidance_interval=[0,600]".
  # Round 12 (planned; no machine came): per-solve gains of the re-noised target, chosen with scripts/anchor_target.py
  # on the CPU (docs/results.md "Round 12"): TEACHER_ROWS="k2:16:10:0:1:g31 k2:16:10:1:1:g31 k2:16:10:2:1:g31 ..."
  # X_g31="loss.teacher_guidance_interval=[0,300] loss.teacher_solve_gains=[3,1]".
  # Round 13 (planned; no machine came): + the deterministic student sampler (renoise_gamma=0) regressed to the
  # teacher's plain endpoint, as a p-family row that keeps its tag: TEACHER_ROWS="k2:16:10:0:1:g31 k2:16:10:1:1:g31
  # k2:16:10:0:1:g315 k2p:16:10:0:1:d3 k2p:16:10:1:1:d3 k2p:16:10:0:1:d3k4", X_g315="... loss.teacher_solve_gains=[3,1.5]",
  # X_d3="renoise_gamma=0 loss.teacher_guidance_interval=[0,300] loss.teacher_guidance_gain=3",
  # X_d3k4="sampler_steps=4 renoise_gamma=0 loss.teacher_guidance_interval=[0,300] loss.teacher_guidance_gain=3".
  # Then (end of the twelfth session; the CPU scored it, no machine came): the student's sampler at renoise_gamma=0.5
  # with the teacher re-noised the same way — the K = 2 target has val FD 0.60 / alignment 0.937 / diversity 0.967
  # (docs/results.md "Round 13"; gain 4: 0.54 / 0.951 / 0.954, an h5g4 row):
  # TEACHER_ROWS="k2:16:10:0:1:h5 k2:16:10:1:1:h5 k2:16:10:0:1:h5g4 k2:16:10:0:1:i300g3"
  # X_h5="renoise_gamma=0.5 loss.teacher_guidance_interval=[0,300] loss.teacher_guidance_gain=3", X_h5g4 the same
  # with loss.teacher_guidance_gain=4, X_i300g3 the same
  # without renoise_gamma (the control: round 11's i300g3 row), from K2_INIT=checkpoints/base/e2e_2step.safetensors.
  # Round 14 (run 2026-12-07, docs/results.md "Round 14"): TEACHER_ROWS="k2:16:10:{0,1,2}:1:h5g4 k2:16:10:0:1:h5
  # k2:16:10:0:1:h75g4 k2:16:10:0:1:i300g4" (X_h75g4: renoise_gamma=0.75, X_i300g4: gain 4 at γ = 1), ROW_SECONDS=380,
  # then the same command with ROW_SECONDS=290 on the warm machine (every row resumes): h5g4 at ~1,360 steps has test
  # K = 2 FD 0.552x, diversity 0.913 and alignment 0.909 (the student's 0.918). Next (planned): the same from scratch
  # for longer, and the target's alignment raised (X_h5g5: gain 5), the anchor on all four chains (a fifth field of 4:
  # "k2:16:10:0:4:h5g4"), and K = 4 from base/e2e (a call with base/e2e in the tree and base/e2e_2step out):
  # TEACHER_ROWS="mix:16:10:0:1:h5g4k4 mix:16:10:1:1:h5g4k4 mix:16:10:2:1:h5g4k4" X_h5g4k4="sampler_steps=4
  # sampler_steps_mix=null renoise_gamma=0.5 loss.teacher_guidance_interval=[0,300] loss.teacher_guidance_gain=4"
  # (its K = 4 target: val FD 0.59 / alignment 0.942 / diversity 0.962 on the CPU).
  # Round 15 (run 2026-12-07, docs/results.md "Round 15"): EVAL_DIALS="1.5 2.0" SNAP_MIN=100000, K2_INIT as above,
  # TEACHER_ROWS="k2:16:10:{0,1,2}:4:h5g4 k2:16:10:0:4:h5g5 k2:16:30:0:1:h5g4 k2:16:10:0:1:h5g4" 370 s + 300 s, then
  # with base/e2e in the tree "k4:16:10:{0,1,2}:4:h5g5 k4:16:10:0:4:h5g4" 380 s + 220 s (X_h5g5: gain 5): the shipped
  # base/e2e (k4 h5g5c4_s1, w 2, γ 0.7 chosen on val on the CPU; meets the bar on test) and base/e2e_2step (k2
  # h5g4c4_s1, w 2; alignment 0.002 short). Next (planned): the K = 4 recipe's 3 seeds with EVAL_DIALS="2.0/0.6
  # 2.0/0.7 2.0/0.8" and FP16_ROWS=1 FP16_MAX=2 (every seed's file comes back); K = 2 from round 10's e2e_2step
  # (git show b8cf1b2:checkpoints/base/e2e_2step.safetensors) with gain 5 on all chains, 3 seeds, two calls, with
  # EVAL_DIALS="1.5 1.75 2.0 1.75/0.4".
  # Round 16 (run 2026-12-07, docs/results.md "Round 16", which has the commands): K4_INIT / K2_INIT round 9's and
  # round 10's files copied into runs/init, K4_STEPS=910, TEACHER_ROWS="k4:16:10:{0,1,2}:4:h5g5 k2:16:10:0:4:h5g5",
  # 480 s + 180 s, EVAL_DIALS_K4="2.0 2.0/0.6 2.0/0.7 2.0/0.8" EVAL_DIALS_K2="1.75 2.0 1.75/0.4": K = 4 meets the bar
  # with 3 seeds at w 2, γ 0.7; K = 2 seed 0 at 1,528 steps meets it at w 1.75, γ 0.4 (the shipped files). Next
  # (planned): seeds 1 and 2 of the K = 2 row to ~1,530 steps (TEACHER_ROWS="k2:16:10:1:4:h5g5 k2:16:10:2:4:h5g5",
  # two calls of ~480 s and ~300 s), with BAR=margin and EVAL_DIALS_K2="1.5 1.75 2.0 1.75/0.4 2.0/0.4".
  # Round 17 (run 2026-12-07, docs/results.md "Round 17"): those two rows with K2_STEPS=1528, 400 s + 70 s (2 rows:
  # ~0.28 s a step on an H100), then FINAL=1 BAR=margin; the dial for the 3 seeds together on val:
  # `results_probe.py DIR... --group k2t16a10h5g5c4 --bar --margin` -> w 1.75, γ 0.4; K = 2 meets the bar with 3 seeds.
  for spec in ${TEACHER_ROWS:-mix:16:10:0 mix:16:10:1 mix:16:10:2 k2:16:10:0 k2:16:10:1 k2:16:10:2 mix:16:3:0 k2:16:3:0}; do
    IFS=: read -r fam steps lam seed chains tag <<< "$spec"
    xv=X_${tag:-none}; tagx=${!xv:-}
    [ -z "$tag" ] || [ -n "$tagx" ] || { echo "TEACHER_ROWS $spec: X_$tag is not set" >&2; continue; }
    name=${fam}t${steps}a${lam}${tag}_s$seed; preset=anchored   # round 15: ...c$chains when chains != 1
    [ "${chains:-1}" = 1 ] || name=${fam}t${steps}a${lam}${tag}c${chains}_s$seed
    x="loss.teacher_renoise=true loss.anchor_samples=${chains:-1} $tagx"
    init=checkpoints/base/e2e.safetensors
    [[ $fam == k2* ]] && preset=anchored-2step && init=${K2_INIT:-$init}
    # round 15: k4 (`anchored` with K fixed at 4, one model per K as k2 is), from K4_INIT (default base/e2e)
    [[ $fam == k4* ]] && x="$x sampler_steps=4 sampler_steps_mix=null" && init=${K4_INIT:-$init}
    # K4_STEPS / K2_STEPS (rounds 16 / 17) stop the k4 / k2 rows at that step (before, rows stopped by time)
    cap=${fam:0:2}_STEPS; cap=${cap^^}
    [[ $fam == k[24]* && -n ${!cap:-} ]] && x="$x train.steps=${!cap}"
    [[ $fam == *p ]] && x="loss.anchor_samples=${chains:-1} $tagx"   # round 13: the tag's overrides kept
    (PRESET=$preset INIT=$init row "$name" $A loss.anchor="$lam" loss.anchor_to=teacher \
       loss.teacher="$T" loss.teacher_steps="$steps" $x train.seed="$seed"; final "$name"; save) &
  done
  wait
  fp16_best
fi
if [[ "${STAGE:-all}" == refresh ]]; then   # round 7's second stage, in place: from the student, the anchor's model
  # becomes the network's EMA every REFRESH network steps (loss.anchor_refresh) and the discriminator is kept.
  # ref_s* (K-mix) and k2ref_s* (K = 2) against round 7's two-stage files; refg_s0 adds the minibatch-std term.
  #   FAST="train.compile=reduce-overhead checkpointing=false" STAGE=refresh ROW_SECONDS=400 ROW_KS= FINAL=1 ...
  A="$KEEP loss.anchor_refresh=${REFRESH:-1500}"
  (student; final_student) &
  for seed in 0 1 2; do
    (PRESET=anchored row ref_s$seed $A train.seed=$seed; final ref_s$seed; save) &
    (PRESET=anchored-2step row k2ref_s$seed $A train.seed=$seed; final k2ref_s$seed; save) &
  done
  (PRESET=anchored row refg_s0 $A loss.gan_group_std=true train.seed=0; final refg_s0; save) &
  wait
  fp16_best
fi
if [[ "${STAGE:-all}" == confirm ]]; then   # round 3: the shipped recipe, 3 seeds, and K = 1 taken out of the mix
  # SPLIT=test EVAL_N=10000 STEPS=800 ROW_SECONDS=480 FAST="train.compile=reduce-overhead checkpointing=false" \
  #   STAGE=confirm bash scripts/gpu/quality_probe.sh
  student &
  for seed in 0 1 2; do
    PRESET=adversarial row "adversarial_seed$seed" loss.lpips_weights=$LP train.seed=$seed &
    PRESET=adversarial row "adversarial_k24_seed$seed" loss.lpips_weights=$LP sampler_steps_mix=[2,4] train.seed=$seed &
  done
  wait
fi
if [[ "${STAGE:-all}" != bench ]]; then
  save
  python3 scripts/results_probe.py "$R" --plain
fi

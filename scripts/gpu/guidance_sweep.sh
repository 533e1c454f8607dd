#!/usr/bin/env bash
# Sampling-time guidance input w of the LCM student and of the E2E models (validation split, so w may be chosen on it),
# plus the memory and step-time benchmarks at the `base` preset. Evaluation needs only the cached reference features
# of the real splits (E2EDIFF_CACHE; `e2ediff evaluate --split val|test` writes them on first use) and the prompt cache.
#   bash scripts/gpu/guidance_sweep.sh [LCM] [E2E_K4] [E2E_K2]
set -uo pipefail
cd "$(dirname "$0")/../.."
export E2EDIFF_DATA_DIR=${E2EDIFF_DATA_DIR:-$PWD/.gpu/fashion-mnist} E2EDIFF_CACHE=${E2EDIFF_CACHE:-$PWD/.gpu/cache}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LCM=${1:-checkpoints/base/lcm.safetensors}; E4=${2:-checkpoints/base/e2e.safetensors}; E2=${3:-.gpu/models/base_e2_lpips10_lr1e-6.safetensors}
R=${R:-runs/guidance}; N=${EVAL_N:-10000}; mkdir -p "$R"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
for w in ${WS:-1.0 1.25 1.5 2.0 2.5 3.0}; do
  for spec in "lcm $LCM 4" "e2e $E4 4" "lcm $LCM 2" "e2e $E2 2"; do
    set -- $spec
    while [ "$(jobs -rp | wc -l)" -ge "${WAVE:-8}" ]; do sleep 1; done
    python3 -m e2ediff evaluate --checkpoint "$2" --steps "$3" --w "$w" --num-samples "$N" --split val \
      --output "$R/eval_${1}_w${w}_k${3}_val.json" 2>&1 | grep "fd=" | sed "s/^/$1 k=$3 w=$w val: /" &
  done
done
wait
python3 benchmarks/e2e_memory.py --device cuda 2>&1 | tail -8
python3 benchmarks/step_time.py --device cuda 2>&1 | tail -6
[ -n "${OUT:-}" ] && tar czf "$OUT/guidance.tgz" "$R"/*.json

#!/usr/bin/env bash
# The shipped `base` models (student and both E2E fine-tunes) at K = 1, 2, 4 with the project's evaluator, one run:
#   EVAL_N=10000 SPLIT=test bash scripts/eval_shipped.sh      # ~20 min on 2 CPU cores; DEVICE=cuda on a GPU
#   MODELS="lcm e2e" ...                                       # a subset (default: lcm e2e e2e_2step e2e_1step)
set -uo pipefail
cd "$(dirname "$0")/.."
R=${R:-runs/eval-shipped}; N=${EVAL_N:-10000}; SPLIT=${SPLIT:-test}; DEVICE=${DEVICE:-cpu}
E=${E2EDIFF:-.venv/bin/e2ediff}
mkdir -p "$R"
for name in ${MODELS:-lcm e2e e2e_2step e2e_1step}; do
  for k in 1 2 4; do
    $E evaluate --checkpoint checkpoints/base/$name.safetensors --steps $k --num-samples "$N" --split "$SPLIT" \
      --device "$DEVICE" --output "$R/eval_${name}_k${k}_${SPLIT}.json" 2>&1 | tail -n 1 | sed "s/^/$name K=$k: /"
  done
done

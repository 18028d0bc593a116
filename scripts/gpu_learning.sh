#!/usr/bin/env bash
# The learning protocol on the shipped architecture, in full, on a GPU (tinygrad's CUDA backend), in one call.
#
#   scripts/gpu_learning.sh [OUT_DIR [PART...]]    # default OUT_DIR: results/gpu; PART: exploration A C (default: all)
#
# Runs, each with the shipped defaults (paired probes, signal steps) and printing its table:
#   exploration: bench.exploration: leader vs served accuracy of the shipped model on the full test split;
#   A: bench.continual protocol A with $MODEL (beautiful_mnist), $A_STEPS steps (25,000, the issue's budget),
#      eval every $A_EVAL_EVERY (500);
#   C: bench.continual protocol C (gradual drift) with $MODEL, $C_STEPS steps (5,000), eval every $C_EVAL_EVERY
#      (250), learning vs frozen.
# The base model of A and C trains $BASE_STEPS (1,000) steps first. Each writes JSON (partial rows as they
# arrive) and a PNG into OUT_DIR. The device is DEV (default CUDA; tinygrad 0.14 refuses the old CUDA=1).
# Needs the package importable (an installed mpserve or PYTHONPATH=.) and the Fashion-MNIST files
# (MPSERVE_DATASET_DIR or Debian's package). scripts/gpu_check.sh runs part A as one of its checks.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
shift || true
parts=${*:-exploration A C}
mkdir -p "$out"
export DEV=${DEV:-CUDA} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
model=${MODEL:-beautiful_mnist}
$py -c 'from tinygrad import Device; print("tinygrad device:", Device.DEFAULT)'
for part in $parts; do
  case $part in
    exploration)
      $py -m bench.exploration --json "$out/exploration.json" --plot "$out/exploration.png" ;;
    A)
      $py -m bench.continual --protocol A --model "$model" --base-steps "${BASE_STEPS:-1000}" --steps "${A_STEPS:-25000}" \
        --eval-every "${A_EVAL_EVERY:-500}" --no-progress --json "$out/continual_A_$model.json" \
        --plot "$out/continual_A_$model.png" ;;
    C)
      $py -m bench.continual --protocol C --model "$model" --base-steps "${BASE_STEPS:-1000}" --steps "${C_STEPS:-5000}" \
        --eval-every "${C_EVAL_EVERY:-250}" --no-progress --json "$out/continual_C_$model.json" \
        --plot "$out/continual_C_$model.png" ;;
    *)
      echo "gpu_learning.sh: unknown part '$part' (exploration, A or C)" >&2
      exit 2 ;;
  esac
done

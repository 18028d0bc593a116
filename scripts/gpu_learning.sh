#!/usr/bin/env bash
# The learning protocol on the shipped architecture, in full, on a GPU (tinygrad's CUDA backend), in one call.
#
#   scripts/gpu_learning.sh [OUT_DIR]          # default OUT_DIR: results/gpu
#
# Runs, each with the shipped defaults (paired probes, signal steps) and printing its table:
#   1. bench.exploration: leader vs served accuracy of the shipped model on the full test split;
#   2. bench.continual protocol A with beautiful_mnist, 25,000 steps (the issue's budget), eval every 500;
#   3. bench.continual protocol C (gradual drift) with beautiful_mnist, 5,000 steps, learning vs frozen.
# Each writes JSON (partial rows as they arrive) and a PNG into OUT_DIR. Needs the package importable
# (an installed mpserve or PYTHONPATH=.) and the Fashion-MNIST files (MPSERVE_DATASET_DIR or Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
mkdir -p "$out"
export CUDA=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c 'from tinygrad import Device; print("tinygrad device:", Device.DEFAULT)'
$py -m bench.exploration --json "$out/exploration.json" --plot "$out/exploration.png"
$py -m bench.continual --protocol A --model beautiful_mnist --base-steps 1000 --steps "${A_STEPS:-25000}" \
  --eval-every 500 --no-progress --json "$out/continual_A_beautiful_mnist.json" \
  --plot "$out/continual_A_beautiful_mnist.png"
$py -m bench.continual --protocol C --model beautiful_mnist --base-steps 1000 --steps "${C_STEPS:-5000}" \
  --eval-every 250 --no-progress --json "$out/continual_C_beautiful_mnist.json" \
  --plot "$out/continual_C_beautiful_mnist.png"

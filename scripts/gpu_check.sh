#!/usr/bin/env bash
# The GPU checks in one call on a lent GPU machine where tinygrad is not installed (see bench/gpu_check.py):
# the NumPy/tinygrad delta twins bit for bit on the GPU, the engine's tests there, materialize time, plain vs
# perturbed inference per batch size, and protocol A on beautiful_mnist. JSON, log and plot into $OUT.
#
#   scripts/gpu_check.sh --prepare     # here: wheels (Python 3.12, x86-64) and Fashion-MNIST into .gpu/ (git-ignored)
#   bash scripts/gpu_check.sh          # there, with .gpu/ carried: installs the wheels into /tmp/site, runs on DEV=CUDA
#   scripts/gpu_check.sh --dry-run     # checks every command without running it (tests/processes/test_gpu_check.py)
#   DEV=CPU scripts/gpu_check.sh --tiny   # every step for real at toy sizes, on this CPU (~1 min)
# Other flags go to bench.gpu_check: --budget-s (300), --a-steps (1000), --out (default $OUT, else results/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python

if [ "${1:-}" = "--prepare" ]; then
  # the versions this checkout runs here, as wheels for the GPU machine's Python (3.12, manylinux x86-64)
  pkgs=$($py - <<'PY'
from importlib.metadata import version
names = ["tinygrad", "pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection",
         "python-dotenv", "typing-extensions", "redis"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels .gpu/fashion-mnist
  # shellcheck disable=SC2086
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels $pkgs
  cp "${MPSERVE_DATASET_DIR:-/usr/share/datasets/fashion-mnist}"/*-ubyte.gz .gpu/fashion-mnist/
  du -sh .gpu
  echo 'ready: run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=480)'
  exit 0
fi

if ! $py -c 'import tinygrad' 2>/dev/null; then
  if ! ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check: tinygrad is not installed and .gpu/wheels/ is empty: run scripts/gpu_check.sh --prepare first" >&2
    exit 2
  fi
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .gpu/fashion-mnist ] && export MPSERVE_DATASET_DIR=${MPSERVE_DATASET_DIR:-$PWD/.gpu/fashion-mnist}
export DEV=${DEV:-CUDA} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec $py -m bench.gpu_check "$@"

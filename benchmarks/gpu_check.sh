#!/usr/bin/env bash
# The prepared GPU check (one call, under 8 minutes on one GPU): rflow-ct sampling and decoding time and
# peak memory beside NVIDIA's A100 figures (benchmarks/gpu_check.py), then the streamed encoder at 512^3
# (benchmarks/tsp_encode.py --cuda-only).
#
# The GPU machine has torch but cannot fetch packages: the other Python dependencies come from wheels
# carried beside the checkout, made here with
#   .venv/bin/pip download --only-binary=:all: --python-version 3.X -d .wheels monai nibabel pyyaml jsonschema tqdm pandas scipy
# with the GPU machine's Python version for 3.X (torch and its dependencies are already there and may be
# deleted from .wheels/); .wheels/ is git-ignored: carry it with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import monai, nibabel, yaml, jsonschema" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links .wheels monai nibabel pyyaml jsonschema tqdm pandas scipy \
        || { echo "gpu_check: missing Python packages and no usable wheels in .wheels/" >&2; exit 2; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 380 "$PY" benchmarks/gpu_check.py "$@"
# The streamed encoder at 512^3 within 16 GB of GPU memory (its maps in host memory).
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 90 "$PY" benchmarks/tsp_encode.py --cuda-only || echo "tsp_encode_gpu: failed or timed out"

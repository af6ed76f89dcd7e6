#!/usr/bin/env bash
# GPU check of the dictionary-linear kernels, < 5 minutes on one GPU:
#   1. the CUDA tests of tests/kernels/test_kernels.py (Triton decode/prefill vs the reference, torch.compile);
#   2. benchmarks/layer_latency.py on the GPU (CUDA-graph timing), JSON + markdown.
# Results go to $OUT (set by the device runner) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
export TRITON_DEFAULT_FP_FUSION=1  # silence Triton 3.9's default-change warning; keeps the current default
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"

python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible")
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY

status=0
timeout 180 python -m pytest -q -o addopts= -p no:cacheprovider tests/kernels/test_kernels.py -k "cuda" -x \
    2>&1 | tee "$RESULTS/gpu_tests.log" || status=$?
timeout 150 python benchmarks/layer_latency.py --device cuda --budget 0.3 --json "$RESULTS/kernels_gpu.json" \
    2>&1 | tee "$RESULTS/gpu_bench.log" || status=$?
exit "$status"

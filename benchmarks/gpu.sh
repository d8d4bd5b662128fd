#!/usr/bin/env bash
# The GPU figures in one short run, for a CUDA machine: the tests that skip without CUDA (a training step under
# torch.cuda.set_sync_debug_mode("error"), grouped_mm on the GPU against the reference loop, conversion on the
# device), then bench_layer.py on CUDA bfloat16 with grouped_mm used directly as the roofline-like reference, and the
# whole model's training step. Sized for about 6 minutes on one H200 (not yet run on a GPU: none has been lent).
# Each part writes its own files as it ends, so a run cut short keeps what finished.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (default benchmarks/results/gpu; $PYTHON, default python3, holds CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-benchmarks/results/gpu}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__)" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u +"%Y-%m-%d %H:%M UTC" | tee "$OUT/date.txt"
$PY -m pytest -q -p no:cacheprovider tests/layers/test_device_dispatch.py tests/conversion/test_init_devices.py \
    tests/layers/test_kernels.py -k "cuda" 2>&1 | tee "$OUT/cuda_tests.log"
$PY benchmarks/bench_layer.py --device cuda --dtypes bf16 --reps 10 --resolve-seconds 4 --out "$OUT/bench_layer_bf16.md"
$PY benchmarks/bench_model.py --device cuda --dtype bf16 --reps 60 --out "$OUT/bench_model_bf16.md"

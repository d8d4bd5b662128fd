#!/usr/bin/env bash
# The GPU figures in one short run, for a CUDA machine: the tests that skip without CUDA (a training step under
# torch.cuda.set_sync_debug_mode("error"), grouped_mm on the GPU against the reference loop, conversion on the
# device), then bench_layer.py on CUDA bfloat16 with grouped_mm used directly as the roofline-like reference, the
# whole model's training step, and where that step's time goes (torch.profiler). About 4 minutes on one H200
# (2026-12-04). A one-point run of bench_layer goes first: if the layer cannot run there, the script stops before the
# long parts. Each part has its own time limit and writes its own files as it ends, so a run cut short keeps what
# finished.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (default benchmarks/results/gpu; $PYTHON, default python3, holds CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-benchmarks/results/gpu}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
$PY -c "import torch, torch.nn.functional as F, transformers; assert torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, 'transformers', transformers.__version__, 'F.grouped_mm', hasattr(F, 'grouped_mm'))" \
    || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
date -u +"%Y-%m-%d %H:%M UTC"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/layers/test_device_dispatch.py \
    tests/conversion/test_init_devices.py tests/layers/test_kernels.py -k "cuda" 2>&1 | tee "$OUT/cuda_tests.log"
timeout 60 $PY benchmarks/bench_layer.py --device cuda --dtypes bf16 --experts 8 --tokens 1024 --reps 2 \
    --resolve-seconds 1 --out "${TMPDIR:-/tmp}/moeify_gpu_smoke.md" || { echo "bench_layer cannot run here"; exit 1; }
timeout 270 $PY benchmarks/bench_layer.py --device cuda --dtypes bf16 --reps 10 --resolve-seconds 3 \
    --out "$OUT/bench_layer_bf16.md"
timeout 150 $PY benchmarks/bench_model.py --device cuda --dtype bf16 --reps 100 --out "$OUT/bench_model_bf16.md"
timeout 90 $PY benchmarks/profile_step.py --device cuda --dtype bf16 --steps 5 --out "$OUT/profile_step_bf16.md"

#!/usr/bin/env bash
# Every performance benchmark, one after the other, each writing Markdown and JSON to benchmarks/results/.
# Run on a quiet machine: each table's ratios come from variants interleaved in one run, but another busy
# process still adds noise. About 75 minutes on the 2-core AVX-512 development machine (bench_model alone 17); on
# the AVX2 one bench_layer alone took about 65 (torch's bfloat16 baselines are slow there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY benchmarks/bench_layer.py                     # the layer vs transformers, dense and the roofline
$PY benchmarks/bench_kernels.py                   # what each cpu-kernel trick buys: large groups
$PY benchmarks/bench_kernels.py --experts 64 128 256 --tokens 64 256 --without reference grouped_mm \
    --out benchmarks/results/bench_kernels_small.md  # few rows per expert
$PY benchmarks/bench_kernels.py --dtype bf16 --experts 64 128 256 --tokens 64 256 --without reference grouped_mm \
    --out benchmarks/results/bench_kernels_small_bf16.md  # the same in bfloat16
$PY benchmarks/bench_skinny.py                    # the native kernels' ops against torch's, by rows per expert
$PY benchmarks/bench_zeroing.py                   # zeroing the experts without tokens: each way, in training steps
$PY benchmarks/bench_model.py                     # one training step of t5-small and its Switch-8 conversion
$PY benchmarks/profile_step.py                    # where that step's time goes
$PY benchmarks/bench_convert.py                   # conversion and loading: wall time and peak RSS
$PY benchmarks/bench_onnx.py --parts forward generate quantize  # onnxruntime vs eager, KV cache, QMoE
if $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    PYTHON=$PY benchmarks/gpu.sh                  # where CUDA is: the GPU figures (benchmarks/results/gpu/)
fi

#!/usr/bin/env bash
# The training study of docs/results.md: every run it reports, in the order they ran (seeds interleaved, so the
# variants of one seed share the machine's conditions), then figures.sh. About an hour on 2 CPU cores.
#   bash benchmarks/study/run.sh [SCRATCH]    # checkpoints go to SCRATCH (default runs/study), CSVs to docs/results/runs
set -euo pipefail
cd "$(dirname "$0")/../.."
SCRATCH=${1:-runs/study}
MOEIFY=${MOEIFY:-.venv/bin/moeify}
# One thread per run: runs are timed against each other, and a second core would be shared with the rest of
# the machine anyway. Every run: 1,024 encoder tokens per step (16 x 64), evaluation on 8 fixed batches.
export OMP_NUM_THREADS=1
COMMON=(--seq-len 64 --batch-size 16 --eval-every 50 --log-every 10 --validation-batches 8 --keep 1 --force)
train() { local name=$1; shift; echo "== $name"; "$MOEIFY" train "$@" "${COMMON[@]}" -o "$SCRATCH/$name"; }

for s in 0 1 2; do
    # 1. From scratch: dense against Switch-8 and Switch-16 (experts drawn fresh, every other FFN, cf 1.25).
    train dense-s$s t5-tiny --dense --seed $s --steps 600
    train switch8-s$s t5-tiny --experts 8 --init random --seed $s --steps 600
    train switch16-s$s t5-tiny --experts 16 --init random --seed $s --steps 600
    # 2. Upcycling: 300 dense steps, then 300 more from that checkpoint, dense or upcycled to Switch-8.
    train pre-s$s t5-tiny --dense --seed $s --steps 300
    pre=$SCRATCH/pre-s$s/checkpoints/step-300
    train dense-continued-s$s "$pre" --dense --seed $s --steps 300 --group dense-continued
    train upcycled8-s$s "$pre" --experts 8 --upcycle-scale none --seed $s --steps 300 --group upcycled8
    train upcycled8-auto-s$s "$pre" --experts 8 --upcycle-scale auto --seed $s --steps 300 --group upcycled8-auto
    # 3. Selective precision: bf16 autocast with the router in float32 (the paper) or in bfloat16.
    train bf16-router-fp32-s$s t5-tiny --experts 8 --init random --precision bf16 --seed $s --steps 600
    train bf16-router-bf16-s$s t5-tiny --experts 8 --init random --precision bf16 --router-dtype bfloat16 \
        --seed $s --steps 600
done

# What docs/results.md is drawn from: each run's run.json and metrics.csv (checkpoints stay in SCRATCH).
for run in "$SCRATCH"/*/; do
    name=$(basename "$run")
    mkdir -p "docs/results/runs/$name"
    cp "$run/run.json" "$run/metrics.csv" "docs/results/runs/$name/"
done
bash benchmarks/study/figures.sh

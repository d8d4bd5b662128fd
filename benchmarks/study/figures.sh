#!/usr/bin/env bash
# docs/results.md's tables and figures, from the committed runs alone: moeify compare over docs/results/runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
MOEIFY=${MOEIFY:-.venv/bin/moeify}
R=docs/results/runs
compare() { local out=$1; shift; echo "== $out"; "$MOEIFY" compare "$@" -o "docs/results/$out.png" --force; }
compare scratch $R/dense-s? $R/switch8-s? $R/switch16-s?
compare upcycling $R/dense-continued-s? $R/upcycled8-s? $R/upcycled8-auto-s?
compare router-precision $R/bf16-router-fp32-s? $R/bf16-router-bf16-s?

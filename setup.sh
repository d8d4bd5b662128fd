#!/usr/bin/env bash
# Create .venv with everything moeify needs, then install moeify itself in editable mode.
# torch is pinned first: 2.13.0 is the CPU build this project develops and tests against.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

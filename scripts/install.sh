#!/usr/bin/env bash
# Creates the virtual environment .venv and installs buildllm into it.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     runtime plus the test extras
# On a machine without an NVIDIA GPU it takes the CPU build of torch (about 190 MB), never the
# multi-GB CUDA build that a bare `pip install torch` pulls on Linux.
set -euo pipefail
venv=${VENV:-.venv}
extras=${1:-}
torch_version=${TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${pip[@]}" "torch==$torch_version"
    else
        # A local CPU wheel (pip's find-links) wins; elsewhere PyTorch's CPU index serves it.
        "${pip[@]}" "torch==$torch_version+cpu" 2>/dev/null \
            || "${pip[@]}" "torch==$torch_version+cpu" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

if [ -n "$extras" ]; then
    "${pip[@]}" -e ".[$extras]"
else
    "${pip[@]}" -e .
fi

# The C++ decoding step (src/buildllm/generation/fast_decode.py), compiled now for this processor
# rather than at the first `generate`; where it cannot be, generation uses the readable model.
"$venv/bin/python" -m buildllm.generation.fast_decode || true

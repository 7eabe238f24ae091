#!/usr/bin/env bash
# llama-cpp-python from PyPI (it builds llama.cpp from source, CPU only, with the machine's
# native flags) in its own venv: the optional comparison of `loraplex bench quant`, which
# runs scripts/bench-llamacpp.py with it. Not needed by the tests. About 10 minutes on 2 cores.
# Idempotent; prints the venv's python.
set -euo pipefail
CACHE="${LORAPLEX_CACHE:-$HOME/.cache/loraplex}"
VENV="${LORAPLEX_LLAMA_VENV:-$CACHE/venv-llama}"
if ! "$VENV/bin/python" -c "import llama_cpp, gguf" 2>/dev/null; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake; }
  python3 -m venv "$VENV"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install -q "llama-cpp-python==0.3.36" "gguf==0.19.0" >&2
fi
echo "$VENV/bin/python"

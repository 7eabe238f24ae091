#!/usr/bin/env bash
# `cargo build --release --features cuda` with the toolkit from scripts/setup-cuda.sh, in a
# target directory of its own (the CUDA build shares no compiled candle with the CPU one, and
# switching features in one directory would rebuild both each time). Works without a GPU.
# Extra arguments go to cargo, e.g. `scripts/build-cuda.sh --tests` or `--bin loraplex`.
# Run what it built with the environment it prints: eval "$(scripts/setup-cuda.sh)".
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(./scripts/setup-cuda.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$HOME/.cache/loraplex/target-cuda}"
mkdir -p "$CARGO_TARGET_DIR"
echo "build-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR" >&2
cargo build --release --features cuda "$@"

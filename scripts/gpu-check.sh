#!/usr/bin/env bash
# The numerics tests and the training benchmarks on a GPU: tests/gradients.rs,
# tests/host_train.rs and tests/smollm2.rs with LORAPLEX_TEST_DEVICE=cuda, then
# `loraplex bench train` and `loraplex bench tenants` (both run on the default device, which
# is CUDA/bf16 in a `cuda` build with a GPU). Output goes to stdout and, where $OUT is set,
# to $OUT/gpu-check.log.
#
#   scripts/gpu-check.sh            a GPU machine with cargo and registry access: build with
#                                   scripts/build-cuda.sh, then run the checks.
#   scripts/gpu-check.sh pack       here, no GPU needed: build, and bundle the binaries and
#                                   the model into .gpu/ for the lent GPU machine.
#   scripts/gpu-check.sh device     on the lent GPU machine (the device tool's `run`).
#
# The lent machine (an H200 with driver 580 / CUDA 13.0, PyTorch's CUDA 13 wheels installed)
# reaches no network and has no Rust toolchain, so nothing can be built there: it runs what
# `pack` built here, against the CUDA 13 libraries already installed there (libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13: PyTorch's
# nvidia-* wheels or the system toolkit) and the machine's own libcuda.so.1. This machine's
# glibc (2.36) is older than that image's, so its binaries run there.
#
# A call carries at most 64 MiB and the model alone is 94 MB, so `pack` splits the bundle
# into parts under .gpu/ (ignored by git) and prints one device call per part. Each call
# carries .gpu/manifest and its part and runs `bash scripts/gpu-check.sh device`, which keeps
# the parts in /root/loraplex-gpu until all have arrived, then unpacks and runs the checks.
# The machine is given back 30 s after a call, and the stash with it: make the calls back to
# back. The device tool sends the session's own checkout: this script must be committed
# there and `pack` run there, so that .gpu/ sits in the checkout that travels.
#
# Time limits per step (seconds) can be changed with GPU_CHECK_TEST_TIMEOUT and
# GPU_CHECK_BENCH_TIMEOUT; at their defaults (100, 120) even a run where every step times out
# fits in one 10-minute call. Logs are at warn (RUST_LOG) so the tables stay readable.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
MODEL_REL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TESTS=(gradients host_train smollm2)
PART_SIZE=56m
STASH=/root/loraplex-gpu
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-100}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-120}"

log() { echo "gpu-check: $*" >&2; }

# Build loraplex and the three test binaries with the cuda feature; print "name path" lines.
build() {
  ./scripts/fetch-model.sh >&2
  ./scripts/build-cuda.sh --bin loraplex "${TESTS[@]/#/--test=}" --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])'
}

# Put the directory of each CUDA library the binary needs on LD_LIBRARY_PATH, where the
# loader does not already find it.
find_libs() {
  local bin="$1" lib dir
  for lib in $(ldd "$bin" | awk '/not found/ {print $1}'); do
    # The driver's own folder first; never a stub or a forward-compatibility libcuda.
    dir="$(find /usr/local/nvidia /usr/lib /usr/local/cuda*/ /opt /usr/local/lib /root \
      -name "$lib" -not -path '*/stubs/*' -not -path '*/compat/*' 2>/dev/null |
      head -n 1 | xargs -r dirname || true)"
    if [ -n "$dir" ]; then
      log "$lib from $dir"
      export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  done
  if ldd "$bin" | grep -q 'not found'; then
    ldd "$bin" | grep 'not found' >&2
    log "libraries missing for $bin"
    return 1
  fi
}

# Run the checks with loraplex and the test binaries from directory $1.
run_checks() {
  local bin="$1" model="$2" fail=0 t
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  find_libs "$bin/loraplex"
  export LORAPLEX_TEST_DEVICE=cuda LORAPLEX_MODEL_PATH="$model" RUST_BACKTRACE=1
  export RUST_LOG="${RUST_LOG:-warn}"
  for t in "${TESTS[@]}"; do
    log "cargo test --test $t (on CUDA)"
    timeout "$TEST_TIMEOUT" "$bin/$t" --test-threads=1 --nocapture || { fail=1; log "FAILED: $t"; }
  done
  log "loraplex bench train"
  timeout "$BENCH_TIMEOUT" "$bin/loraplex" bench train --model-path "$model" --steps 5 ||
    { fail=1; log "FAILED: bench train"; }
  log "loraplex bench tenants"
  timeout "$BENCH_TIMEOUT" "$bin/loraplex" bench tenants --model-path "$model" ||
    { fail=1; log "FAILED: bench tenants"; }
  [ "$fail" = 0 ] && log "all checks passed" || log "some checks failed"
  return "$fail"
}

with_log() {
  if [ -n "${OUT:-}" ]; then "$@" 2>&1 | tee "$OUT/gpu-check.log"; else "$@"; fi
}

case "${1:-local}" in
local)
  declare -A exe
  while read -r name path; do exe[$name]="$path"; done < <(build)
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' EXIT
  for n in loraplex "${TESTS[@]}"; do ln -s "${exe[$n]:?no $n binary built}" "$dir/$n"; done
  eval "$(./scripts/setup-cuda.sh)"
  with_log run_checks "$dir" "$REPO/$MODEL_REL"
  ;;
pack)
  declare -A exe
  while read -r name path; do exe[$name]="$path"; done < <(build)
  rm -rf .gpu && mkdir -p .gpu/bundle
  for n in loraplex "${TESTS[@]}"; do
    cp "${exe[$n]:?no $n binary built}" ".gpu/bundle/$n"
    strip ".gpu/bundle/$n"
  done
  cp "$MODEL_REL" .gpu/bundle/model.gguf
  # The tests read tests/reference/ under the directory they were built in.
  echo "$REPO" >.gpu/bundle/manifest_dir
  tar -C .gpu/bundle -cf - . | gzip -6 >.gpu/bundle.tar.gz
  rm -rf .gpu/bundle
  (cd .gpu && split -b "$PART_SIZE" -d bundle.tar.gz part- && rm bundle.tar.gz)
  (cd .gpu && sha256sum part-* >manifest)
  log "bundle in .gpu/ ($(du -sh .gpu | cut -f1)); make these device calls back to back:"
  for p in .gpu/part-*; do
    echo "  run(command='bash scripts/gpu-check.sh device', carry=['.gpu/manifest', '$p'], timeout_s=600)"
  done
  ;;
device)
  [ -f .gpu/manifest ] || { log "no .gpu/manifest: carry it (see pack)"; exit 2; }
  mkdir -p "$STASH"
  for p in .gpu/part-*; do if [ -e "$p" ]; then cp "$p" "$STASH/"; fi; done
  (cd "$STASH" && sha256sum --quiet -c "$REPO/.gpu/manifest" >/dev/null 2>&1) || {
    have="$(cd "$STASH" && ls part-* 2>/dev/null | tr '\n' ' ')"
    log "have parts: ${have:-none}; the next call carries the next one (.gpu/manifest lists all)"
    exit 0
  }
  rm -rf "$STASH/bundle" && mkdir -p "$STASH/bundle"
  cat $(awk '{print "'"$STASH"'/" $2}' .gpu/manifest) | gunzip | tar -C "$STASH/bundle" -xf -
  built_in="$(cat "$STASH/bundle/manifest_dir")"
  if [ "$built_in" != "$REPO" ] && [ ! -e "$built_in" ]; then
    mkdir -p "$(dirname "$built_in")" && ln -s "$REPO" "$built_in"
  fi
  with_log run_checks "$STASH/bundle" "$STASH/bundle/model.gguf"
  ;;
*)
  echo "usage: $0 [local|pack|device]" >&2
  exit 2
  ;;
esac

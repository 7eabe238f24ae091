#!/usr/bin/env bash
# A CUDA toolkit for `cargo build --features cuda` on a machine without one (or without a
# GPU): nvcc, headers and libraries from NVIDIA's PyPI wheels, laid out as a CUDA root.
# Idempotent. Prints `export` lines on stdout (progress goes to stderr), so use it as
#
#   eval "$(./scripts/setup-cuda.sh)"
#
# Why CUDA 13.0 and not the -cu12 wheels: the lent GPU machine (an H200, driver 580.x) runs
# CUDA 13.0 and has its libcublas.so.13 etc. installed; a binary linked against CUDA 12
# libraries would not start there, and PTX from a newer nvcc than the driver is refused at
# load time. The -cu12 nvcc wheel (12.9.86) also lacks the `nvcc` driver binary itself.
#
# What candle needs (candle-core 0.11 -> candle-kernels via cudaforge, and cudarc 0.19):
#   - `nvcc` on PATH; cudaforge takes the CUDA root as nvcc's ../ and nvcc finds cicc,
#     libdevice and the headers through its nvcc.profile (nvidia-cuda-nvcc, -crt, -nvvm,
#     -cccl, -runtime for cuda_runtime.h).
#   - CUDA_COMPUTE_CAP: there is no nvidia-smi to ask. 90 = Hopper (H100/H200); cudaforge
#     turns it into sm_90a, so the PTX is for Hopper only.
#   - cudarc uses its `dynamic-linking` feature (candle chooses it): the binary links
#     -lcuda -lcublas -lcublasLt -lcurand -lnvrtc (and candle-kernels -lcudart), found under
#     $CUDA_HOME/lib64 and lib64/stubs. The wheels ship only versioned names
#     (libcublas.so.13), so lib64/ holds unversioned links to them.
#   - No wheel ships libcuda (the driver's library). lib64/stubs/libcuda.so is built here
#     from cuda.h: every driver entry point, each returning CUDA_ERROR_STUB_LIBRARY (34). It
#     satisfies the linker, and on a machine without a driver, put on LD_LIBRARY_PATH, it
#     lets the binary start (Device::new_cuda then fails and loraplex runs on the CPU).
#     Never put it on the library path of a machine with a real driver.
set -euo pipefail

CACHE="${LORAPLEX_CACHE:-$HOME/.cache/loraplex}"
VENV="${LORAPLEX_CUDA_VENV:-$CACHE/venv-cuda}"
ROOT="${LORAPLEX_CUDA_ROOT:-$CACHE/cuda}"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# CUDA 13.0 update 2, the versions torch 2.11+cu130 pins (what the GPU machine has).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.1.0.3
)

stamp="$VENV/.loraplex-cuda-wheels"
if [ "$(cat "$stamp" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  echo "setup-cuda: installing ${WHEELS[*]} into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "${WHEELS[@]}" >&2
  echo "${WHEELS[*]}" >"$stamp"
fi

# The wheels of CUDA 13 share one prefix, nvidia/cu13/{bin,include,lib,nvvm}.
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
tk="$site/nvidia/cu13"
for f in bin/nvcc bin/ptxas nvvm/bin/cicc nvvm/libdevice/libdevice.10.bc include/cuda.h \
  include/cuda_runtime.h include/cccl/cuda/std/version lib/libcudart.so.13; do
  [ -e "$tk/$f" ] || { echo "setup-cuda: $tk/$f is missing from the wheels" >&2; exit 1; }
done

# The CUDA root: bin/, include/, nvvm/ point into the wheels; lib64/ has the linker names.
mkdir -p "$ROOT/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$tk/$d" "$ROOT/$d"; done
for so in "$tk"/lib/*.so.*; do
  name="$(basename "$so")"
  ln -sfn "$so" "$ROOT/lib64/$name"
  ln -sfn "$so" "$ROOT/lib64/${name%%.so.*}.so"
done
for a in "$tk"/lib/*.a; do ln -sfn "$a" "$ROOT/lib64/$(basename "$a")"; done

stub="$ROOT/lib64/stubs/libcuda.so"
if [ ! -e "$stub" ] || [ "$stub" -ot "$tk/include/cuda.h" ] || [ "$stub" -ot "$0" ]; then
  echo "setup-cuda: building the libcuda stub" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # cudaProfiler.h is in no wheel; cudarc declares its two entry points.
  printf 'CUresult cuProfilerStart(\nCUresult cuProfilerStop(\n' >"$tmp/extra"
  # Preprocess three ways so that the current (_v2, _v3 ...), the legacy and the
  # per-thread-stream (_ptsz/_ptds) names are all defined.
  {
    printf '#include <cuda.h>\n' | cc -E -I"$tk/include" -x c -
    printf '#define __CUDA_API_VERSION_INTERNAL\n#include <cuda.h>\n' | cc -E -I"$tk/include" -x c -
    printf '#define CUDA_API_PER_THREAD_DEFAULT_STREAM\n#include <cuda.h>\n' | cc -E -I"$tk/include" -x c -
    cat "$tmp/extra"
  } | grep -oE '\bCUresult[[:space:]]+(cu[A-Za-z0-9_]+)[[:space:]]*\(' |
    sed -E 's/CUresult[[:space:]]+//; s/[[:space:]]*\($//' | sort -u >"$tmp/names"
  [ "$(wc -l <"$tmp/names")" -gt 300 ] || { echo "setup-cuda: too few driver entry points in cuda.h" >&2; exit 1; }
  # Untyped definitions: a caller's arguments are ignored; every call reports "stub library".
  sed -E 's/.*/int &(void) { return 34; }/' "$tmp/names" >"$tmp/stub.c"
  cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$tmp/libcuda.so" "$tmp/stub.c"
  mv "$tmp/libcuda.so" "$stub"
  ln -sfn libcuda.so "$ROOT/lib64/stubs/libcuda.so.1"
fi

# LD_LIBRARY_PATH is for running what was built: the wheels' libraries first, and the stub
# last (after any driver already on the path) and only where the loader's cache has no driver.
stubs=""
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then stubs=":$ROOT/lib64/stubs"; fi

cat <<EOF
export CUDA_HOME='$ROOT' CUDA_PATH='$ROOT' CUDA_ROOT='$ROOT'
export PATH='$ROOT/bin':"\$PATH"
export CUDA_COMPUTE_CAP='$COMPUTE_CAP'
export LD_LIBRARY_PATH='$ROOT/lib64'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"'$stubs'
EOF

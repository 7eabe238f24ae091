#!/usr/bin/env bash
# Builds every plugin in this workspace for wasm32-wasip2 (release) and copies
# the components to plugins/dist/<name>.wasm. The host's tests and benchmark
# read them from there (or from $LORAPLEX_PLUGIN_DIST if set).
#
# Target dir: $LORAPLEX_GUEST_TARGET_DIR, else plugins/target. It is kept
# apart from the host's target dir so neither invalidates the other.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target_dir="${LORAPLEX_GUEST_TARGET_DIR:-$here/target}"
dist="${LORAPLEX_PLUGIN_DIST:-$here/dist}"

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi

# Host-only settings (e.g. a linker or -C target-cpu for x86) must not leak in.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET

cargo build --release --locked --target wasm32-wasip2 \
    --manifest-path "$here/Cargo.toml" --target-dir "$target_dir" >&2

mkdir -p "$dist"
out="$target_dir/wasm32-wasip2/release"
for f in "$out"/*.wasm; do
    name="$(basename "$f" .wasm)"
    # cargo names cdylib artifacts with underscores; dist uses the crate name.
    cp "$f" "$dist/${name//_/-}.wasm.tmp"
    mv "$dist/${name//_/-}.wasm.tmp" "$dist/${name//_/-}.wasm"
    echo "$dist/${name//_/-}.wasm"
done

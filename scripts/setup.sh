#!/usr/bin/env bash
# Everything the tests need besides cargo: the shipped model (from PyPI) and, when present,
# the wasm32-wasip2 target and the reference plugins. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-model.sh
if [ -x plugins/build.sh ]; then
  rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
  ./plugins/build.sh
fi
# The tinker SDK for the end-to-end test.
./scripts/setup-sdk.sh >/dev/null
# Debian's chromium and playwright (into the SDK's venv) for the console's browser test.
./scripts/setup-console.sh >/dev/null
# schemathesis for the API fuzzing test (tests/fuzz_api.rs).
./scripts/setup-fuzz.sh >/dev/null
# tinker-cookbook and its requirements (torch, transformers) for tests/cookbook.rs.
./scripts/setup-cookbook.sh >/dev/null

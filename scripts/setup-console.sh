#!/usr/bin/env bash
# The real browser for the console's browser test (tests/console_browser.rs): Debian's
# chromium, driven over the DevTools protocol by Python playwright installed into the SDK's
# virtualenv (no `playwright install`: it launches the system browser). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
PY="$(./scripts/setup-sdk.sh)"
if ! "$PY" -c 'import playwright.sync_api' 2>/dev/null; then
  "$PY" -m pip install --quiet --disable-pip-version-check "playwright==1.65.2"
fi
echo "$PY"

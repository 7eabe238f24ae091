#!/usr/bin/env bash
# A Python virtualenv with the official tinker SDK (and nothing else heavy), for the SDK
# end-to-end test (tests/sdk_e2e.rs), with `requests` for the replaced Flask server's client. Idempotent; prints the interpreter's path.
set -euo pipefail
VENV="${LORAPLEX_SDK_VENV:-$HOME/.cache/loraplex/venv-sdk}"
if ! "$VENV/bin/python" -c 'import tinker, requests, sys; sys.exit(tinker.__version__ != "0.38.0")' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "tinker==0.38.0" numpy "requests==2.34.2"
fi
echo "$VENV/bin/python"

#!/usr/bin/env bash
# A Python virtualenv with schemathesis (pinned), for the API fuzzing test
# (tests/fuzz_api.rs, hooks in tests/fuzz/hooks.py). Idempotent; prints the interpreter's path.
set -euo pipefail
VERSION=4.32.5
VENV="${LORAPLEX_FUZZ_VENV:-$HOME/.cache/loraplex/venv-fuzz}"
if ! "$VENV/bin/python" -c "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$VERSION')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION"
fi
echo "$VENV/bin/python"

#!/usr/bin/env bash
# A Python virtualenv with tinker-cookbook 0.6.1 and its requirements (torch, transformers,
# datasets: several GB), for tests/cookbook.rs, and a Hugging Face cache holding the served
# model's tokenizer (exported from the GGUF by `loraplex export-hf --tokenizer-only`) that
# the cookbook reads offline. Idempotent; prints the interpreter's path.
#
# `pip install tinker-cookbook==0.6.1` does not resolve from PyPI (its pin
# tml-renderers>=0.4.1 has no release there), so its other requirements are installed
# first (tests/cookbook/requirements.txt) and the cookbook itself with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LORAPLEX_COOKBOOK_VENV:-$HOME/.cache/loraplex/venv-cookbook}"
if ! "$VENV/bin/python" -c 'import tinker_cookbook, torch, transformers, sys; from importlib.metadata import version; sys.exit(version("tinker_cookbook") != "0.6.1")' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/cookbook/requirements.txt
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "tinker-cookbook==0.6.1"
fi
echo "$VENV/bin/python"

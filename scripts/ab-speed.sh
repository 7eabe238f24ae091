#!/usr/bin/env bash
# Old against new in one sitting: `bench train --case "train 1x128 all"`, `bench tenants`
# and the decode table of `bench kernels`, each binary in turn, ROUNDS times, on the shipped
# SmolLM2. The new binary runs with LORAPLEX_BASE_DTYPE=f32 (what the old one does: expand
# at load) and with the default (as stored). Usage:
#   scripts/ab-speed.sh OLD_BINARY NEW_BINARY [ROUNDS] > log
set -euo pipefail
old="$1"; new="$2"; rounds="${3:-3}"
run() { # label binary dtype args...
  local label="$1" bin="$2" dtype="$3"; shift 3
  echo "=== $label"
  if [ -n "$dtype" ]; then LORAPLEX_BASE_DTYPE="$dtype" "$bin" "$@"; else "$bin" "$@"; fi 2>/dev/null | grep '^|' || true
}
for r in $(seq 1 "$rounds"); do
  for v in "old::$old" "new-f32:f32:$new" "new-as-stored:as-stored:$new"; do
    IFS=: read -r label dtype bin <<<"$v"
    run "round $r $label train" "$bin" "$dtype" bench train --case "train 1x128 all" --steps 5
    run "round $r $label tenants" "$bin" "$dtype" bench tenants
    run "round $r $label kernels" "$bin" "$dtype" bench kernels
  done
done

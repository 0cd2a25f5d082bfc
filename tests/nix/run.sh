#!/usr/bin/env bash
# Nix checks that work without a binary cache: every .nix file parses, and (when nixpkgs' lib is
# at hand) the modules evaluate with lib.evalModules and produce what their tests expect.
# NIXPKGS_LIB=/path/to/nixpkgs.lib/lib enables the evaluation (CI cannot fetch it, so it skips).
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nix-instantiate >/dev/null 2>&1; then
  echo "SKIP nix checks: nix-instantiate not installed (apt-get install nix-bin)"
  exit 0
fi
passed=0 failed=0
for f in $(git ls-files '*.nix'); do
  if nix-instantiate --parse "$f" >/dev/null; then
    passed=$((passed + 1))
  else
    echo "FAIL nix parse: $f"
    failed=$((failed + 1))
  fi
done
echo "nix parse: $passed files ok"
# The unit data must evaluate with plain nix-instantiate (no nixpkgs): render it.
if units=$(mktemp -d) && "$(dirname "$0")/../system/render-units" "$units" >/dev/null; then
  for u in "$units"/*.service; do
    grep -q '^Type=notify$' "$u" && grep -q '^WatchdogSec=' "$u" || { echo "FAIL rendered unit $u lacks Type=notify/WatchdogSec"; failed=$((failed + 1)); }
  done
  echo "unit data: rendered $(ls "$units" | wc -l) units"
  passed=$((passed + 1))
else
  echo "FAIL unit data does not evaluate"
  failed=$((failed + 1))
fi
if [ -n "${NIXPKGS_LIB:-}" ]; then
  for t in tests/nix/*-eval.nix; do
    if out=$(nix-instantiate --eval --strict --json "$t" --arg lib "import $NIXPKGS_LIB" 2>&1); then
      echo "ok   $t: $out"
      passed=$((passed + 1))
    else
      echo "FAIL $t:"
      echo "$out" | tail -20
      failed=$((failed + 1))
    fi
  done
else
  echo "SKIP module evaluation: NIXPKGS_LIB is not set (nixpkgs' lib cannot be fetched in CI)"
fi
echo "nix: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

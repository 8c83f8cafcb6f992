#!/usr/bin/env bash
# Import circles among each crate's top-level modules (exit 1 if any crate has one).
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
for src in crates/*/src; do
  python3 scripts/modcycles.py "$src" || rc=1
done
exit $rc

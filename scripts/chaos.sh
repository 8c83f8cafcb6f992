#!/usr/bin/env bash
# The fault-injection harness in one command: builds Keel with its crash points (the `fail`
# crate, `--features failpoints`) and keel-chaos, then runs histories against real clusters on
# 127.0.0.x with random faults and checks each (linearizability, watch guarantees, durability).
#
#   scripts/chaos.sh                      a short schedule (CI): 3 histories of 40 s, 3/5/3 members
#   scripts/chaos.sh --histories 200 --duration 40 --members 3,5 --total-seconds 7200
#                                         the long run
#   target/release/keel-chaos check target/chaos/hNNNN-SEED/history.json   check a kept history again
#
# Extra arguments go to `keel-chaos run` (see `target/release/keel-chaos run --help`). Histories,
# and the data dirs of failing ones, are kept under target/chaos; exit status 1 on a violation.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -p keel-chaos
# The crash points are compiled into this build of the server only.
cargo build --release --bin keel --features keel/failpoints
if [ $# -eq 0 ]; then
  set -- --histories 3 --duration 40 --members 3,5
fi
exec target/release/keel-chaos run --keel target/release/keel "$@"

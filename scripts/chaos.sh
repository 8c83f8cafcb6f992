#!/usr/bin/env bash
# The fault-injection harness in one command: builds Keel with its crash points (the `fail`
# crate, `--features failpoints`) and keel-chaos, then runs it.
#
#   scripts/chaos.sh        the short schedule (CI, a few minutes): 3 histories of 40 s on 3, 5
#                           and 3 members with every kind of fault, then 25 crash-loop iterations
#   scripts/chaos.sh run --histories 200 --duration 40 --members 3,5 --total-seconds 7200
#                           the long run (histories: real clusters on 127.0.0.x, random faults,
#                           recorded clients and watchers, linearizability/watch/durability checks)
#   scripts/chaos.sh crash-loop --iterations 1000
#                           one member SIGKILLed (or crashed at a crash point) 1,000 times
#   scripts/chaos.sh check target/chaos/hNNNN-SEED/history.json
#                           checks a kept history again
#
# Histories of failing runs keep their data dirs, history.json and report.txt under
# target/chaos; the exit status is 1 on any violation. `keel-chaos help run` lists every option.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -p keel-chaos
# The crash points are compiled into this build of the server only.
cargo build --release --bin keel --features keel/failpoints
chaos=target/release/keel-chaos
if [ $# -eq 0 ]; then
  "$chaos" run --histories 3 --duration 40 --members 3,5
  "$chaos" crash-loop --iterations 25
else
  exec "$chaos" "$@"
fi

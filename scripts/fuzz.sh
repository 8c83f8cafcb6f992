#!/usr/bin/env bash
# Runs the cargo fuzz targets (fuzz/fuzz_targets), each for SECONDS (default 60), on the corpora
# kept in the repository (fuzz/corpus/TARGET, which grow as the fuzzer finds new paths).
#
#   scripts/fuzz.sh                 every target for 60 s
#   scripts/fuzz.sh 1800 wal_decode   one target for 30 minutes
#
# Needs the nightly toolchain and cargo-fuzz (installed when missing). A crash leaves its input in
# fuzz/artifacts/TARGET/ and makes this script fail.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wal_decode snap_decode backend_records kv_requests bbolt_read etcd_wal etcd_snap h2fix raft_wire go_duration)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${secs}s"
  cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | grep -E "^(Done|stat::number_of_executed_units|==[0-9]+== ERROR)|panicked|Test unit written"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz: $t FAILED" >&2; exit 1; }
done

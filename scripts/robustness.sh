#!/usr/bin/env bash
# etcd's robustness suite (go.etcd.io/etcd/tests/v3/robustness at v3.7.3) against Keel: its
# Regression scenarios, with Keel's binary given to the suite as `etcd` (-bin-dir). After each
# run the suite reads every member's member/wal with etcd's own WAL reader and checks the
# client histories against it: linearizability, watch guarantees and serializable reads.
# Scenarios that need gofail failpoints compiled into the server (etcd's
# `make gofail-enable`) are skipped by the suite itself; the others must pass.
#
#   scripts/robustness.sh [REGEX]     the Regression scenarios matching REGEX (default: all)
#
# Needs the `go` command and the module proxy; builds the test binary once under
# target/robustness (about 5 minutes on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ver=v3.7.3
filter=${1:-.}
work=$root/target/robustness/$ver
mkdir -p "$work/src" "$work/bin" "$work/run/robustness"
export GO111MODULE=on GOFLAGS=-mod=mod
if [ ! -x "$work/robustness.test" ]; then
  (
    cd "$work/src"
    printf 'module keel.local/robustness\ngo 1.26.0\n' >go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/tests/v3/robustness"\n' >tools.go
    go get "go.etcd.io/etcd/tests/v3@$ver" >&2
    go test -c -o "$work/robustness.test" go.etcd.io/etcd/tests/v3/robustness
  )
fi
[ -x target/release/keel ] || cargo build --release --bin keel
ref=$(scripts/etcd-ref.sh v3.6.16)
ln -sf "$root/target/release/keel" "$work/bin/etcd"
ln -sf "$ref/etcdctl" "$work/bin/etcdctl"
ln -sf "$ref/etcdutl" "$work/bin/etcdutl"
# The suite finds its certificates at ../fixtures from where it runs.
ln -sfn "$(go env GOMODCACHE)/go.etcd.io/etcd/tests/v3@$ver/fixtures" "$work/run/fixtures"
cd "$work/run/robustness"
log=$work/run/robustness.log
rc=0
"$work/robustness.test" -test.run "TestRobustnessRegression/$filter" -test.v -test.timeout 20m -bin-dir "$work/bin" >"$log" 2>&1 || rc=$?
grep -E '^(--- |    --- )|^(PASS|FAIL|ok)' "$log" || true
# Every scenario that ran had its WAL read and its watches and serializable reads validated.
ran=$(grep -c '^    --- PASS' "$log" || true)
validated=$(grep -c 'Watch validation success' "$log" || true)
serializable=$(grep -c 'Serializable validation success' "$log" || true)
echo "robustness: $ran scenarios passed; watch validation ran in $validated, serializable in $serializable (log: $log)"
if [ "$rc" -ne 0 ] || [ "$ran" -eq 0 ] || [ "$validated" -ne "$ran" ] || [ "$serializable" -ne "$ran" ]; then
  echo "robustness: FAILED" >&2
  exit 1
fi

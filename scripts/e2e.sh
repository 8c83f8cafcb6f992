#!/usr/bin/env bash
# Runs etcd's own end-to-end suite against Keel (or, as the oracle, against real etcd).
#
#   scripts/e2e.sh [--suite 3.4|3.6|3.7] [--server keel|etcd] [REGEX]
#
#   --suite 3.4   etcd 3.4.23's suite (Debian golang-etcd-server-dev) with Debian's etcdctl 3.4;
#                 the default. Its list of tests Keel passes: tests/e2e-passing.txt.
#   --suite 3.6   etcd 3.6.16's suite (module go.etcd.io/etcd/tests/v3, package e2e, from the Go
#                 module proxy) with etcdctl and etcdutl 3.6.16 (scripts/etcd-ref.sh). Its list:
#                 tests/e2e36-passing.txt.
#   --suite 3.7   etcd 3.7.3's suite, built the same way, with etcdctl and etcdutl 3.7.3. Its
#                 list: tests/e2e37-passing.txt.
#   --server etcd runs the suite against the real etcd of that line instead of Keel: how the lists'
#                 "what real etcd passes here" was learned.
#   --quick       leave out the tests the list marks "# slow" or "# flaky" (CI runs the 3.7
#                 list this way).
#   --except LIST leave out the tests LIST names too (CI runs the 3.6 list's tests that are not
#                 on the 3.7 list: the others run in the 3.7 suite already).
#   REGEX         run the tests matching REGEX (go test -run syntax) instead of the list.
#
# One process per test (a test that times out in etcd's harness panics the whole binary, which
# would hide the verdicts of every test after it). Prints one verdict line per test and a final
# "N passed, N failed"; each test's log stays in the work directory.
set -euo pipefail
# The whole script is read before it runs (main at the end): editing it during a run is safe.
main() {
root=$(cd "$(dirname "$0")/.." && pwd)
suite=3.4
server=keel
quick=0
except=""
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --server) server=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --except) except=$2; shift 2 ;;
    --) shift; break ;;
    -*) echo "usage: $0 [--suite 3.4|3.6|3.7] [--server keel|etcd] [--quick] [--except LIST] [REGEX]" >&2; exit 2 ;;
    *) break ;;
  esac
done

case "$suite" in
  3.4)
    work=${KEEL_E2E_DIR:-$root/target/e2e}
    list=$root/tests/e2e-passing.txt
    srcdir=/usr/share/gocode/src/go.etcd.io/etcd/tests/e2e
    etcd_bin=/usr/bin/etcd
    mkdir -p "$work/bin"
    ln -sf /usr/bin/etcdctl "$work/bin/etcdctl"
    if [ ! -x "$work/e2e.test" ] || [ "$srcdir" -nt "$work/e2e.test" ]; then
      (cd "$srcdir" && GOPATH=/usr/share/gocode GO111MODULE=off GOFLAGS=-mod=mod go test -c -o "$work/e2e.test" .)
    fi
    # The suite finds its fixtures relative to its own directory.
    rundir=$srcdir
    ;;
  3.6 | 3.7)
    ver=$([ "$suite" = 3.6 ] && echo v3.6.16 || echo v3.7.3)
    tag=${suite//./}
    work=${KEEL_E2E_DIR:-$root/target/e2e$tag}
    list=$root/tests/e2e$tag-passing.txt
    ref=$("$root/scripts/etcd-ref.sh" "$ver")
    etcd_bin=$ref/etcd
    mkdir -p "$work/bin" "$work/src"
    ln -sf "$ref/etcdctl" "$work/bin/etcdctl"
    ln -sf "$ref/etcdutl" "$work/bin/etcdutl"
    export GO111MODULE=on GOFLAGS=-mod=mod
    if [ ! -x "$work/e2e.test" ]; then
      (
        cd "$work/src"
        printf 'module keel.local/e2e%s\ngo 1.24\n' "$tag" >go.mod
        printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/tests/v3/e2e"\n' >tools.go
        go get "go.etcd.io/etcd/tests/v3@$ver" >&2
        go test -c -o "$work/e2e.test" go.etcd.io/etcd/tests/v3/e2e
      )
    fi
    # The suite finds its fixtures (certificates) at ../fixtures from where it runs, and some
    # tests start servers without --data-dir (default.etcd, e1.etcd in the working directory):
    # each test runs in a scratch directory emptied before it.
    rundir=$work/run/e2e
    mkdir -p "$rundir"
    ln -sfn "$(go env GOMODCACHE)/go.etcd.io/etcd/tests/v3@$ver/fixtures" "$work/run/fixtures"
    ;;
  *) echo "e2e: unknown suite $suite (3.4, 3.6 or 3.7)" >&2; exit 2 ;;
esac

case "$server" in
  keel)
    # KEEL_BIN: a copy of the server to test (so that a rebuild meanwhile does not change it).
    keel=${KEEL_BIN:-$root/target/release/keel}
    if [ ! -x "$keel" ]; then
      (cd "$root" && cargo build --release --bin keel)
    fi
    ln -sf "$keel" "$work/bin/etcd"
    ;;
  etcd) ln -sf "$etcd_bin" "$work/bin/etcd" ;;
  *) echo "e2e: unknown server $server (keel or etcd)" >&2; exit 2 ;;
esac

if [ $# -ge 1 ]; then
  regex="$1"
else
  # One test per line; "# ..." after a name is a note ("# slow" and "# flaky" mark what --quick
  # leaves out).
  names=$(grep -v '^\s*#' "$list" | grep -v '^\s*$' | { if [ "$quick" = 1 ]; then grep -vE '# (slow|flaky)'; else cat; fi; } | sed 's/\s*#.*//' |
    { if [ -n "$except" ]; then grep -vxF -f <(grep -v '^\s*#' "$except" | sed 's/\s*#.*//' | grep -v '^\s*$'); else cat; fi; } | paste -sd'|')
  regex="^(${names})\$"
fi

log="$work/e2e.log"
: >"$log"
cd "$rundir"
tests=$("$work/e2e.test" -test.list "$regex" | grep '^Test' || true)
passed=0
failed=0
retried=0
failed_names=()
# Stops whatever servers a test left behind: they would hold the next test's ports.
stop_servers() { pkill -9 -f "$work/bin/etcd " 2>/dev/null || true; }
for t in $tests; do
  limit=${KEEL_E2E_TIMEOUT:-300}
  if [ "$suite" != 3.4 ]; then
    find "$rundir" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  fi
  : >"$work/$t.log"
  for attempt in 1 2 3; do
    set +e
    timeout "$limit" "$work/e2e.test" -bin-dir "$work/bin" -test.run "^${t}\$" -test.v -test.timeout "$((limit - 10))s" >"$work/$t.attempt$attempt.log" 2>&1
    rc=$?
    set -e
    # Both attempts' output stay in the test's log.
    { echo "=== attempt $attempt (exit $rc)"; cat "$work/$t.attempt$attempt.log"; } >>"$work/$t.log"
    [ "$rc" -eq 0 ] && break
    # etcd's harness sometimes fails a passed test on its own goroutine-leak check under load
    # (3.4's ctlV3User never closes its etcdctl process, and the check runs at once after the
    # test: real etcd 3.4.23 fails it too on a loaded machine, twice in a row at times); such a
    # test is run again, up to three attempts, and reported (and counted) as retried. A test
    # that fails any other way is not retried.
    if [ "$attempt" -lt 3 ] && grep -q "^--- PASS: $t " "$work/$t.attempt$attempt.log" && grep -qE "Too many goroutines|Unexpected goroutines running after all test" "$work/$t.attempt$attempt.log"; then
      echo "--- RETRY: $t (etcd harness goroutine check failed after the test passed)"
      retried=$((retried + 1))
      stop_servers
      continue
    fi
    # 3.4's expect reads etcdctl's output through a pty; when etcdctl exits at once after its last
    # write, Linux can hang the pty up before that write is read ("read /dev/ptmx: input/output
    # error" with the output cut short at a line boundary and no error printed by etcdctl). That
    # too is run again (up to three attempts, reported and counted as retried); a cut-short read
    # that shows an etcdctl error is not.
    if [ "$attempt" -lt 3 ] && grep -E 'read /dev/ptmx: input/output error \(expected "[^"]*", got \[[^]]*\]\)' "$work/$t.attempt$attempt.log" | grep -qv -i 'error:' &&
      ! grep -E 'read /dev/ptmx: input/output error \(expected' "$work/$t.attempt$attempt.log" | grep -q -i 'error:'; then
      echo "--- RETRY: $t (etcdctl's output cut short by the pty hang-up in 3.4's expect)"
      retried=$((retried + 1))
      stop_servers
      continue
    fi
    break
  done
  stop_servers
  cat "$work/$t.log" >>"$log"
  if [ "$rc" -eq 0 ] && grep -q "^--- PASS: $t " "$work/$t.attempt$attempt.log"; then
    echo "--- PASS: $t"
    passed=$((passed + 1))
  elif [ "$rc" -eq 0 ] && grep -q "^--- SKIP: $t " "$work/$t.attempt$attempt.log"; then
    echo "--- SKIP: $t"
  else
    echo "--- FAIL: $t (exit $rc; log: $work/$t.log)"
    failed=$((failed + 1))
    failed_names+=("$t")
  fi
done
if [ "$failed" -gt 0 ]; then
  for t in "${failed_names[@]}"; do
    echo "===== $t ====="
    grep -vE '^\s+/usr/|^goroutine |^\s*$' "$work/$t.log" | tail -40
  done
fi
echo "e2e: ${passed} passed (${retried} after a retry), ${failed} failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
}
main "$@"

#!/usr/bin/env bash
# Every fsync and fdatasync on the machine, with the thread that made it, to line slow requests
# up with what the disk was doing (perf's syscall tracepoints; needs root and perf).
#
#   scripts/trace-syncs.sh record DIR      records until interrupted (SIGINT/SIGTERM) into DIR
#   scripts/trace-syncs.sh report DIR [MS] per thread name: count, p50, p99, max; then every sync
#                                          of MS ms or more (20 unless told), and every gap of MS
#                                          or more between two syncs of one thread that syncs
#                                          in steps (keel-reclaim's: the truncate between them)
#
# Times are printed as Unix seconds and UTC, as keel-bench's --slow-ms lines are.
set -euo pipefail
cmd=${1:?record|report}
dir=${2:?DIR}
mkdir -p "$dir"
case "$cmd" in
record)
  # perf stamps tracepoints with CLOCK_MONOTONIC here; the offset to Unix time is kept.
  python3 -c 'import time; print(time.time() - time.clock_gettime(time.CLOCK_MONOTONIC))' >"$dir/mono-offset"
  exec perf record -q -a -k CLOCK_MONOTONIC -o "$dir/syncs.perf" \
    -e syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,syscalls:sys_enter_fsync,syscalls:sys_exit_fsync
  ;;
report)
  ms=${3:-20}
  perf script -i "$dir/syncs.perf" -F comm,tid,time,event 2>/dev/null | python3 -c '
import collections, datetime, re, sys
off = float(open(sys.argv[1]).read())
limit = float(sys.argv[2]) / 1e3
pat = re.compile(r"^\s*(.+?)\s+(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(fdatasync|fsync):")
began, syncs = {}, []
for line in sys.stdin:
    m = pat.match(line)
    if not m:
        continue
    comm, tid, ts, kind, call = m.groups()
    if kind == "enter":
        began[tid] = (float(ts), comm)
    elif tid in began:
        t0, comm = began.pop(tid)
        syncs.append((t0 + off, float(ts) - t0, comm, tid))
syncs.sort()
at = lambda t: "%.3f %s" % (t, datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3])
by = collections.defaultdict(list)
for _, d, comm, _ in syncs:
    by[comm].append(d)
print("syncs by thread name (ms):")
for comm, v in sorted(by.items()):
    v.sort()
    print("  %-18s n=%-8d p50=%-7.2f p99=%-7.2f max=%.1f" % (comm, len(v), v[len(v) // 2] * 1e3, v[int(len(v) * 0.99)] * 1e3, v[-1] * 1e3))
print("syncs of %g ms or more:" % (limit * 1e3))
for t, d, comm, tid in syncs:
    if d >= limit:
        print("  %s %7.1f ms %s %s" % (at(t), d * 1e3, comm, tid))
print("gaps of %g ms or more between a reclaim thread'"'"'s steps:" % (limit * 1e3))
last = {}
for t, d, comm, tid in syncs:
    if comm == "reclaim":
        if tid in last and limit <= t - last[tid] < 5:
            print("  %s %7.1f ms after a step (tid %s)" % (at(last[tid]), (t - last[tid]) * 1e3, tid))
        last[tid] = t + d
' "$dir/mono-offset" "$ms"
  ;;
*)
  echo "usage: $0 record|report DIR [MS]" >&2
  exit 2
  ;;
esac

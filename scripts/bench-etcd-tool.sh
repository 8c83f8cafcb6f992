#!/usr/bin/env bash
# Keel against etcd with etcd's own benchmark tool (go.etcd.io/etcd/v3/tools/benchmark v3.6.8,
# what operators measure etcd with), members on 127.0.0.1-3. Systems alternate run by run; each
# run starts fresh members. Prints one line per run and workload: system, members, workload,
# mean, p50 and p99 latency (the tool's `--precise`), requests/s, and the members' own CPU
# (utime+stime of every member, from /proc) per request; then a table of the medians over runs
# with Keel's ratio to each etcd (< 1 is better for Keel, except requests/s).
#
# Groups (BENCH_GROUPS, default all three):
#   latency  3 members, one client on one connection: put via the leader and via a follower,
#            linearizable get via the leader and via a follower (BENCH_TOTAL requests, 3,000)
#   single   1 member, one client: put; and this disk's own fdatasync of a 300-byte record on a
#            preallocated file in the same directory, measured in the same run (system "disk")
#   matrix   etcd's op-guide matrix on 1 and 3 members: put, txn-put, linearizable and
#            serializable range, 100 clients on 100 connections and 1,000 clients on 100
#            connections, to the leader (and put to all members on 3); BENCH_MATRIX_TOTAL
#            requests each (40,000)
#
#   scripts/bench-etcd-tool.sh                 etcd 3.6.16 and 3.7.3 against Keel (target/release/keel)
#   BENCH_ETCD="v3.6.16"                        which etcd releases (default: v3.6.16 v3.7.3)
#   KEEL_BIN=path/to/keel                       measure this Keel build (default target/release/keel)
#   KEEL_BASE_BIN=path/to/old/keel ...          adds an earlier Keel build (before/after)
#   BENCH_RUNS=3                                runs per system (default 3)
#   BENCH_GROUPS="latency single matrix"        which groups
#
# Needs go (builds the tool once into target/etcd-bench) and scripts/etcd-ref.sh's etcd.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ver=v3.6.8
tooldir=$root/target/etcd-bench/$ver
bm=$tooldir/benchmark
if [ ! -x "$bm" ]; then
  mkdir -p "$tooldir/src"
  (
    cd "$tooldir/src"
    printf 'module keel.local/bm\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/v3 %s\n' "$ver" >go.mod
    # go.etcd.io/etcd/v3 replaces its own modules with local paths: name their releases.
    gomod=$(GOFLAGS=-mod=mod go mod download -json "go.etcd.io/etcd/v3@$ver" | jq -r .GoMod)
    grep -o 'go.etcd.io/etcd/[a-z0-9/]* => ./[a-z0-9/]*' "$gomod" | awk -v v="$ver" '{print "replace " $1 " => " $1 " " v}' >>go.mod
    printf '//go:build tools\n\npackage bm\n\nimport _ "go.etcd.io/etcd/v3/tools/benchmark"\n' >tools.go
    GOFLAGS=-mod=mod go mod tidy
    go build -o "$bm" go.etcd.io/etcd/v3/tools/benchmark
  )
fi
declare -A bin=([keel]=${KEEL_BIN:-$root/target/release/keel})
systems=()
for v in ${BENCH_ETCD:-v3.6.16 v3.7.3}; do
  ref=$(scripts/etcd-ref.sh "$v")
  name=etcd-$(cut -d. -f1,2 <<<"${v#v}")
  bin[$name]=$ref/etcd
  systems+=("$name")
done
ctl=$(scripts/etcd-ref.sh v3.6.16)/etcdctl
[ -x "${bin[keel]}" ] || cargo build --release --bin keel
if [ -n "${KEEL_BASE_BIN:-}" ]; then
  bin[keel-base]=$KEEL_BASE_BIN
  systems+=(keel-base)
fi
systems+=(keel)
total=${BENCH_TOTAL:-3000}
work=$root/target/etcd-bench/run
cpu_of() {
  local t=0 p f
  for p in "$@"; do
    read -ra f <"/proc/$p/stat"
    t=$((t + f[13] + f[14]))
  done
  echo "$t"
}
members_pids=()
members_eps=()
# start_members SYS N: N fresh members of SYS; sets members_pids, members_eps, leader, follower.
start_members() {
  local sys=$1 n=$2 i ic=""
  rm -rf "$work"
  mkdir -p "$work"
  for i in $(seq "$n"); do ic+="m$i=http://127.0.0.$i:25800,"; done
  ic=${ic%,}
  members_pids=()
  members_eps=()
  for i in $(seq "$n"); do
    "${bin[$sys]}" --name "m$i" --data-dir "$work/m$i" \
      --listen-client-urls "http://127.0.0.$i:25790" --advertise-client-urls "http://127.0.0.$i:25790" \
      --listen-peer-urls "http://127.0.0.$i:25800" --initial-advertise-peer-urls "http://127.0.0.$i:25800" \
      --initial-cluster "$ic" --initial-cluster-token lat >"$work/m$i.log" 2>&1 &
    members_pids+=($!)
    members_eps+=("http://127.0.0.$i:25790")
  done
  all=$(IFS=,; echo "${members_eps[*]}")
  for _ in $(seq 100); do "$ctl" --endpoints "$all" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
  leader=$("$ctl" --endpoints "$all" endpoint status -w json | jq -r '.[] | select(.Status.leader == .Status.header.member_id) | .Endpoint')
  follower=$leader
  for e in "${members_eps[@]}"; do [ "$e" != "$leader" ] && follower=$e && break; done
  # The key the ranges read (a 256-byte value, as the op guide's).
  "$ctl" --endpoints "$leader" put 00000000 "$(head -c 256 /dev/zero | tr '\0' v)" >/dev/null
}
stop_members() {
  kill "${members_pids[@]}" 2>/dev/null || true
  wait "${members_pids[@]}" 2>/dev/null || true
}
# measure ROUND SYS MEMBERS NAME TOTAL BENCHMARK-ARGS...: one workload, one result line.
measure() {
  local round=$1 sys=$2 n=$3 name=$4 total=$5 c0 c1 out
  shift 5
  c0=$(cpu_of "${members_pids[@]}")
  out=$("$bm" --precise "$@" --total "$total" 2>/dev/null)
  c1=$(cpu_of "${members_pids[@]}")
  printf '%s %s %s %s mean_ms=%s p50_ms=%s p99_ms=%s req_per_s=%s cpu_ms_per_req=%s\n' "$round" "$sys" "$n" "$name" \
    "$(grep -m1 'Average:' <<<"$out" | awk '{printf "%.3f", $2 * 1000}')" \
    "$(grep -m1 ' 50% in' <<<"$out" | awk '{printf "%.3f", $3 * 1000}')" \
    "$(grep -m1 ' 99% in' <<<"$out" | awk '{printf "%.3f", $3 * 1000}')" \
    "$(grep -m1 'Requests/sec:' <<<"$out" | awk '{printf "%.1f", $2}')" \
    "$(awk -v a="$c0" -v b="$c1" -v n="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.4f", (b - a) * 1000 / hz / n }')" | tee -a "$results"
}
# The disk's own fdatasync: 300-byte records appended to a preallocated 64 MiB file (what a WAL
# does), 3,000 of them, in the directory the members write to.
disk_probe() {
  local round=$1
  mkdir -p "$work"
  python3 - "$work/fdatasync-probe" "$round" <<'PY' | tee -a "$results"
import os, sys, time
path, rnd = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.posix_fallocate(fd, 0, 64 << 20)
os.fsync(fd)
lat, rec = [], b"x" * 300
for _ in range(3000):
    t = time.perf_counter()
    os.write(fd, rec)
    os.fdatasync(fd)
    lat.append(time.perf_counter() - t)
os.close(fd)
os.unlink(path)
lat.sort()
mean = sum(lat) / len(lat)
print(f"{rnd} disk 1 fdatasync mean_ms={mean*1e3:.3f} p50_ms={lat[len(lat)//2]*1e3:.3f} p99_ms={lat[int(len(lat)*0.99)]*1e3:.3f} req_per_s={1/mean:.1f} cpu_ms_per_req=0")
PY
}
group_latency() {
  local round=$1 sys=$2 lat=(--conns 1 --clients 1)
  start_members "$sys" 3
  measure "$round" "$sys" 3 put-via-leader "$total" --endpoints "$leader" "${lat[@]}" put --key-space-size 100000 --val-size 256
  measure "$round" "$sys" 3 put-via-follower "$total" --endpoints "$follower" "${lat[@]}" put --key-space-size 100000 --val-size 256
  measure "$round" "$sys" 3 get-via-leader "$total" --endpoints "$leader" "${lat[@]}" range 00000000 --consistency l
  measure "$round" "$sys" 3 get-via-follower "$total" --endpoints "$follower" "${lat[@]}" range 00000000 --consistency l
  stop_members
}
group_single() {
  local round=$1 sys=$2
  start_members "$sys" 1
  measure "$round" "$sys" 1 put-1-client "$total" --endpoints "$leader" --conns 1 --clients 1 put --key-space-size 100000 --val-size 256
  stop_members
}
group_matrix() {
  local round=$1 sys=$2 n c conns w
  for n in 1 3; do
    start_members "$sys" "$n"
    for c in 100 1000; do
      w=(--endpoints "$leader" --conns 100 --clients "$c")
      measure "$round" "$sys" "$n" "put-$c" "$mtotal" "${w[@]}" put --key-space-size 100000 --val-size 256
      if [ "$n" = 3 ]; then
        measure "$round" "$sys" "$n" "put-all-$c" "$mtotal" --endpoints "$all" --conns 100 --clients "$c" put --key-space-size 100000 --val-size 256
      fi
      measure "$round" "$sys" "$n" "txn-put-$c" "$mtotal" "${w[@]}" txn-put --key-space-size 100000 --val-size 256
      measure "$round" "$sys" "$n" "range-l-$c" "$mtotal" "${w[@]}" range 00000000 --consistency l
      measure "$round" "$sys" "$n" "range-s-$c" "$mtotal" "${w[@]}" range 00000000 --consistency s
    done
    stop_members
  done
}
results=$root/target/etcd-bench/results.txt
: >"$results"
mtotal=${BENCH_MATRIX_TOTAL:-40000}
groups=${BENCH_GROUPS:-latency single matrix}
for round in $(seq 1 "${BENCH_RUNS:-3}"); do
  for g in $groups; do
    [ "$g" = single ] && disk_probe "$round"
    for sys in "${systems[@]}"; do "group_$g" "$round" "$sys"; done
  done
done
# The medians over runs, and Keel's ratio to each etcd.
python3 - "$results" "${systems[@]}" <<'PY'
import statistics, sys
rows, order = {}, []
for line in open(sys.argv[1]):
    f = line.split()
    w = (f[2], f[3])
    if w not in order:
        order.append(w)
    for kv in f[4:]:
        k, v = kv.split("=")
        rows.setdefault((w, k, f[1]), []).append(float(v))
systems = sys.argv[2:]
etcds = [s for s in systems if s.startswith("etcd")]
print("| members | workload | metric | " + " | ".join(systems) + " | " + " | ".join(f"keel/{e}" for e in etcds) + " |")
print("|---" * (3 + len(systems) + len(etcds)) + "|")
for w in order:
    if w[1] == "fdatasync":
        med = statistics.median(rows[(w, "p50_ms", "disk")])
        p99 = statistics.median(rows[(w, "p99_ms", "disk")])
        print(f"| 1 | disk fdatasync (300 B) | p50_ms / p99_ms | {med:g} / {p99:g} |" + " |" * (len(systems) - 1 + len(etcds)))
        continue
    for m in ["p50_ms", "p99_ms", "mean_ms", "req_per_s", "cpu_ms_per_req"]:
        med = {s: statistics.median(rows[(w, m, s)]) for s in systems if (w, m, s) in rows}
        if not med:
            continue
        cells = [f"{med[s]:g}" if s in med else "-" for s in systems]
        ratios = [f"{med['keel'] / med[e]:.2f}x" if "keel" in med and med.get(e) else "-" for e in etcds]
        print(f"| {w[0]} | {w[1]} | {m} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
PY

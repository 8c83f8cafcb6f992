#!/usr/bin/env bash
# The latency-bound paths measured with etcd's own benchmark tool (go.etcd.io/etcd/v3/tools/
# benchmark v3.6.8, what operators measure etcd with): 3 members on 127.0.0.1-3, one client on
# one connection, put via the leader and via a follower, linearizable get via the leader and via
# a follower. Systems alternate run by run; each run starts fresh members. Prints one line per
# run and workload: system, workload, mean, p50 and p99 latency (the tool's `--precise`),
# requests/s, and the members' own CPU (utime+stime of all three, from /proc) per request; then
# a table of the medians over runs with Keel's ratio to each etcd (< 1 is better for Keel,
# except requests/s).
#
#   scripts/bench-etcd-tool.sh                 etcd 3.6.16 and 3.7.3 against Keel (target/release/keel)
#   BENCH_ETCD="v3.6.16"                        which etcd releases (default: v3.6.16 v3.7.3)
#   KEEL_BASE_BIN=path/to/old/keel ...          adds an earlier Keel build (before/after)
#   BENCH_RUNS=3 BENCH_TOTAL=3000               runs per system (default 3), requests per workload
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
declare -A bin=([keel]=$root/target/release/keel)
systems=()
for v in ${BENCH_ETCD:-v3.6.16 v3.7.3}; do
  ref=$(scripts/etcd-ref.sh "$v")
  name=etcd-$(cut -d. -f1,2 <<<"${v#v}")
  bin[$name]=$ref/etcd
  systems+=("$name")
done
ctl=$(scripts/etcd-ref.sh v3.6.16)/etcdctl
[ -x target/release/keel ] || cargo build --release --bin keel
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
run_sys() {
  local sys=$1 round=$2 i ic="" pids=() eps=() all
  rm -rf "$work"
  mkdir -p "$work"
  for i in 1 2 3; do ic+="m$i=http://127.0.0.$i:25800,"; done
  ic=${ic%,}
  for i in 1 2 3; do
    "${bin[$sys]}" --name "m$i" --data-dir "$work/m$i" \
      --listen-client-urls "http://127.0.0.$i:25790" --advertise-client-urls "http://127.0.0.$i:25790" \
      --listen-peer-urls "http://127.0.0.$i:25800" --initial-advertise-peer-urls "http://127.0.0.$i:25800" \
      --initial-cluster "$ic" --initial-cluster-token lat >"$work/m$i.log" 2>&1 &
    pids+=($!)
    eps+=("http://127.0.0.$i:25790")
  done
  all=$(IFS=,; echo "${eps[*]}")
  for _ in $(seq 100); do "$ctl" --endpoints "$all" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
  local leader follower w name op ep c0 c1 out
  leader=$("$ctl" --endpoints "$all" endpoint status -w json | jq -r '.[] | select(.Status.leader == .Status.header.member_id) | .Endpoint')
  for e in "${eps[@]}"; do [ "$e" != "$leader" ] && follower=$e && break; done
  "$bm" --endpoints "$leader" put --total 1 >/dev/null 2>&1
  for w in "put-via-leader put $leader" "put-via-follower put $follower" "get-via-leader get $leader" "get-via-follower get $follower"; do
    read -r name op ep <<<"$w"
    c0=$(cpu_of "${pids[@]}")
    if [ "$op" = put ]; then
      out=$("$bm" --precise --endpoints "$ep" --conns 1 --clients 1 put --total "$total" --key-space-size 100000 --val-size 256 2>/dev/null)
    else
      out=$("$bm" --precise --endpoints "$ep" --conns 1 --clients 1 range 00000000 --consistency l --total "$total" 2>/dev/null)
    fi
    c1=$(cpu_of "${pids[@]}")
    printf '%s %s %s mean_ms=%s p50_ms=%s p99_ms=%s req_per_s=%s cpu_ms_per_req=%s\n' "$round" "$sys" "$name" \
      "$(grep -m1 'Average:' <<<"$out" | awk '{printf "%.3f", $2 * 1000}')" \
      "$(grep -m1 ' 50% in' <<<"$out" | awk '{printf "%.3f", $3 * 1000}')" \
      "$(grep -m1 ' 99% in' <<<"$out" | awk '{printf "%.3f", $3 * 1000}')" \
      "$(grep -m1 'Requests/sec:' <<<"$out" | awk '{printf "%.1f", $2}')" \
      "$(awk -v a="$c0" -v b="$c1" -v n="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", (b - a) * 1000 / hz / n }')" | tee -a "$results"
  done
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
results=$root/target/etcd-bench/results.txt
: >"$results"
for round in $(seq 1 "${BENCH_RUNS:-3}"); do
  for sys in "${systems[@]}"; do run_sys "$sys" "$round"; done
done
# The medians over runs, and Keel's ratio to each etcd.
python3 - "$results" "${systems[@]}" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    vals = dict(kv.split("=") for kv in f[3:])
    for k, v in vals.items():
        rows.setdefault((f[2], k, f[1]), []).append(float(v))
systems = sys.argv[2:]
etcds = [s for s in systems if s.startswith("etcd")]
print("| workload | metric | " + " | ".join(systems) + " | " + " | ".join(f"keel/{e}" for e in etcds) + " |")
print("|---" * (2 + len(systems) + len(etcds)) + "|")
for w in ["put-via-leader", "put-via-follower", "get-via-leader", "get-via-follower"]:
    for m in ["p50_ms", "p99_ms", "mean_ms", "req_per_s", "cpu_ms_per_req"]:
        med = {s: statistics.median(rows[(w, m, s)]) for s in systems if (w, m, s) in rows}
        if not med:
            continue
        cells = [f"{med[s]:g}" if s in med else "-" for s in systems]
        ratios = [f"{med['keel'] / med[e]:.2f}x" if "keel" in med and med.get(e) else "-" for e in etcds]
        print(f"| {w} | {m} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
PY

#!/usr/bin/env bash
# Keel against today's etcd on this machine, in one run: the same keel-bench workloads against
# etcd 3.6.x and 3.7.x (built from the Go module proxy by scripts/etcd-ref.sh), etcd 3.4.23
# (Debian's etcd-server, when installed) and Keel. Every workload runs BENCH_RUNS times per
# system, the systems alternating run by run, each run on fresh data directories (same disk).
#
#   scripts/bench-compare.sh [OUT.md]              full run (about 40 minutes with 4 systems)
#   KEEL_BENCH_QUICK=1 scripts/bench-compare.sh    tiny totals (a smoke run)
#   BENCH_SYSTEMS="etcd-3.6 keel"                   which systems (default: etcd-3.6 etcd-3.7 etcd-3.4 keel)
#   KEEL_BIN=path/to/keel KEEL_BENCH_BIN=...        measure these builds (no cargo build)
#   KEEL_BASE_BIN=path/to/old/keel                  adds system keel-base: an earlier Keel build, for
#                                                   before/after ratios in the same alternating run
#   BENCH_RUNS=2                                    runs per workload and system (default 2)
#   BENCH_GROUPS="kv latency bigread lease memory"  which groups of workloads (default: all)
#   BENCH_TABLE_ONLY=results.jsonl                  only print the table of earlier runs' results
#
# Besides throughput and latency, each run records every member's own CPU time (utime+stime of
# each server process from /proc, before and after) divided by the requests: client and servers
# share the machine's cores, so throughput ratios are capped by the client; CPU per request is
# not. The table gives the mean over runs and Keel's ratio to each etcd (throughput: > 1 is
# better for Keel; latency, CPU, memory, time: < 1 is better for Keel).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/bench/results.md}
work=$root/target/bench
mkdir -p "$work"
quick=${KEEL_BENCH_QUICK:-0}
runs=${BENCH_RUNS:-2}
groups=${BENCH_GROUPS:-kv latency bigread lease memory}
systems=${BENCH_SYSTEMS:-etcd-3.6 etcd-3.7 etcd-3.4 keel}
# KEEL_BIN (and KEEL_BENCH_BIN) measure given builds instead of this checkout's.
if [ -z "${KEEL_BIN:-}" ]; then
  (cd "$root" && cargo build --release --bin keel --bin keel-bench >/dev/null 2>&1)
fi
keel_bin=${KEEL_BIN:-$root/target/release/keel}
bench=${KEEL_BENCH_BIN:-$root/target/release/keel-bench}
ctl=$("$root/scripts/etcd-ref.sh" v3.6.16)/etcdctl
clk=$(getconf CLK_TCK)
export RUST_BACKTRACE=0

binary() {
  case "$1" in
    keel) echo "$keel_bin" ;;
    etcd-3.6) echo "$("$root/scripts/etcd-ref.sh" v3.6.16)/etcd" ;;
    etcd-3.7) echo "$("$root/scripts/etcd-ref.sh" v3.7.3)/etcd" ;;
    etcd-3.4) echo "${ETCD34_BIN:-/usr/bin/etcd}" ;;
    keel-base) echo "${KEEL_BASE_BIN:-$root/target/keel-base/keel}" ;;
    *) echo "unknown system $1" >&2; return 1 ;;
  esac
}
avail=()
for s in $systems; do
  b=$(binary "$s")
  if [ -x "$b" ]; then avail+=("$s"); else echo "skipping $s: $b not found" >&2; fi
done
"$(binary keel)" --version >/dev/null 2>&1 || true

scale() { if [ "$quick" = 1 ]; then echo $(( ($1 + 99) / 100 )); else echo "$1"; fi; }

pids=()
stop_all() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT

healthy() { curl -sf "http://$1/health" >/dev/null 2>&1; }

# start SYSTEM MEMBERS: a fresh cluster; sets $eps (client endpoints) and $pids.
start() {
  local sys=$1 n=$2 bin cluster="" i
  bin=$(binary "$sys")
  rm -rf "$work/data"
  mkdir -p "$work/data"
  for i in $(seq 1 "$n"); do cluster+="m$i=http://127.0.0.$i:23800,"; done
  cluster=${cluster%,}
  eps=""
  for i in $(seq 1 "$n"); do
    "$bin" --name "m$i" --data-dir "$work/data/m$i" \
      --listen-client-urls "http://127.0.0.$i:23790" --advertise-client-urls "http://127.0.0.$i:23790" \
      --listen-peer-urls "http://127.0.0.$i:23800" --initial-advertise-peer-urls "http://127.0.0.$i:23800" \
      --initial-cluster "$cluster" --initial-cluster-token bench --quota-backend-bytes 8589934592 \
      >"$work/$sys-m$i.log" 2>&1 &
    pids+=($!)
    eps+="127.0.0.$i:23790,"
  done
  eps=${eps%,}
  for _ in $(seq 1 300); do
    local ok=1
    for e in ${eps//,/ }; do healthy "$e" || ok=0; done
    [ "$ok" = 1 ] && return 0
    sleep 0.1
  done
  echo "$sys did not become healthy" >&2
  tail -20 "$work/$sys-m1.log" >&2
  return 1
}

# CPU ticks (utime + stime) of every member process.
cpu_ticks() {
  local t=0 p
  for p in "${pids[@]}"; do
    t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}
. "$root/scripts/bench-lib.sh" # rss_kb, leader_changes
raft_index() { "$ctl" --endpoints "$eps" endpoint status -w json 2>/dev/null | jq '[.[].Status.raft_index] | max'; }

results=$work/results.jsonl
[ -n "${BENCH_TABLE_ONLY:-}" ] || : >"$results"
record() { # system members workload metric value unit
  printf '{"system":"%s","members":%s,"workload":"%s","metric":"%s","value":%s,"unit":"%s"}\n' "$@" >>"$results"
}

# measure SYS N NAME KEEL-BENCH-ARGS...: one keel-bench run; records throughput, p50, p99 and
# the servers' CPU per request.
measure() {
  local sys=$1 n=$2 name=$3
  shift 3
  local j c0 c1 ops
  c0=$(cpu_ticks)
  j=$("$bench" --endpoints "$eps" --json "$@")
  c1=$(cpu_ticks)
  ops=$(echo "$j" | jq .ops)
  record "$sys" "$n" "$name" "throughput" "$(echo "$j" | jq .rps)" "ops/s"
  record "$sys" "$n" "$name" "p50 latency" "$(echo "$j" | jq .p50_ms)" "ms"
  record "$sys" "$n" "$name" "p99 latency" "$(echo "$j" | jq .p99_ms)" "ms"
  if [ "$ops" -gt 0 ]; then
    record "$sys" "$n" "$name" "server CPU per request" "$(echo "($c1 - $c0) * 1000000 / $clk / $ops" | bc -l)" "us"
  fi
  echo "$sys x$n $name: $(echo "$j" | jq -c '{rps, p50_ms, p99_ms, errors}') cpu $(( c1 - c0 )) ticks"
}

group_kv() { # SYS N: throughput-bound workloads on one cluster
  local sys=$1 n=$2 c
  start "$sys" "$n"
  "$bench" --endpoints "$eps" put --total 1 --key-space-size 1 >/dev/null
  for c in 100 1000; do
    local conns=$(( c / 10 ))
    measure "$sys" "$n" "put, $c clients" --clients "$c" --conns "$conns" put --total "$(scale 60000)" --key-space-size 100000 --val-size 256
    measure "$sys" "$n" "txn-put, $c clients" --clients "$c" --conns "$conns" txn-put --total "$(scale 60000)" --key-space-size 100000 --val-size 256
    measure "$sys" "$n" "range linearizable, $c clients" --clients "$c" --conns "$conns" range 00000000 --consistency l --total "$(scale 150000)"
    measure "$sys" "$n" "range serializable, $c clients" --clients "$c" --conns "$conns" range 00000000 --consistency s --total "$(scale 150000)"
  done
  stop_all
}

# Keel's per-hop histograms summed over the members: "name sum count" lines.
hop_totals() {
  local e
  for e in ${eps//,/ }; do curl -sf "http://$e/metrics" || true; done |
    awk '/^keel_(raft_hop|server_proposal)_duration_seconds_(sum|count)/ {
      split($1, a, "_seconds_"); kind = a[2]; sub(/\{.*/, "", kind);
      name = a[1]; lbl = ""; if (match($1, /hop="[a-z_]+"/)) lbl = substr($1, RSTART + 5, RLENGTH - 6);
      key = (lbl == "" ? "proposal" : lbl); v[key, kind] += $2; keys[key] = 1 }
      END { for (k in keys) print k, v[k, "sum"] + 0, v[k, "count"] + 0 }'
}

# hops SYS N NAME BEFORE: records the mean of each hop since BEFORE (hop_totals output).
hops() {
  local sys=$1 n=$2 name=$3 before=$4
  hop_totals | while read -r k s c; do
    local s0 c0
    s0=$(echo "$before" | awk -v k="$k" '$1 == k {print $2}'); c0=$(echo "$before" | awk -v k="$k" '$1 == k {print $3}')
    local dc=$(( c - ${c0:-0} ))
    if [ "$dc" -gt 0 ]; then
      # awk, not bc: Prometheus prints small sums in scientific notation.
      record "$sys" "$n" "$name" "hop $k (mean)" "$(awk -v s="$s" -v s0="${s0:-0}" -v dc="$dc" 'BEGIN { printf "%.2f", (s - s0) * 1000000 / dc }')" "us"
    fi
  done
}

# measure_hops SYS N NAME ARGS...: measure, plus Keel's per-hop means for that run.
measure_hops() {
  local before
  before=$(hop_totals)
  measure "$@"
  hops "$1" "$2" "$3" "$before"
}

group_latency() { # SYS N: one client, request after request
  local sys=$1 n=$2
  start "$sys" "$n"
  "$bench" --endpoints "$eps" put --total 1 --key-space-size 1 >/dev/null
  if [ "$n" = 1 ]; then
    measure_hops "$sys" 1 "put, 1 client" put --total "$(scale 10000)" --key-space-size 100000 --val-size 256
    measure_hops "$sys" 1 "get linearizable, 1 client" range 00000000 --total "$(scale 10000)"
  else
    measure_hops "$sys" "$n" "put via leader, 1 client" --target-leader put --total "$(scale 5000)" --key-space-size 100000 --val-size 256
    measure_hops "$sys" "$n" "put via follower, 1 client" --target-follower put --total "$(scale 5000)" --key-space-size 100000 --val-size 256
    measure_hops "$sys" "$n" "get linearizable via leader, 1 client" --target-leader range 00000000 --total "$(scale 5000)"
    measure_hops "$sys" "$n" "get linearizable via follower, 1 client" --target-follower range 00000000 --total "$(scale 5000)"
  fi
  stop_all
}

group_bigread() { # SYS 3: three whole-range reads of ~200 MB on each member while one client writes
  local sys=$1 n=$2 keys e i lc0 lc1 j readers=()
  [ "$n" = 3 ] || return 0
  start "$sys" "$n"
  keys=$(scale 200000)
  "$bench" --endpoints "$eps" --clients 100 --conns 10 put --total "$keys" --key-space-size "$keys" --sequential-keys --val-size 1000 >/dev/null
  lc0=$(leader_changes)
  "$bench" --endpoints "$eps" --target-leader --json put --total "$(scale 3000)" --rate 200 --key-space-size 1000 --val-size 256 >"$work/bigread-writer.json" &
  local writer=$!
  sleep 1
  for e in ${eps//,/ }; do
    for i in 1 2 3; do
      "$bench" --endpoints "$e" --json range x --all-keys --total 1 >"$work/bigread-$e-$i.json" 2>&1 &
      readers+=($!)
    done
  done
  for r in "${readers[@]}"; do wait "$r" || true; done
  wait "$writer" || true
  lc1=$(leader_changes)
  j=$(cat "$work/bigread-writer.json")
  record "$sys" "$n" "3 whole-range reads per member under writes" "longest write" "$(echo "$j" | jq .max_ms)" "ms"
  record "$sys" "$n" "3 whole-range reads per member under writes" "p99 write" "$(echo "$j" | jq .p99_ms)" "ms"
  record "$sys" "$n" "3 whole-range reads per member under writes" "leader changes" "$(( lc1 - lc0 ))" "count"
  echo "$sys x$n bigread: writer $(echo "$j" | jq -c '{max_ms, p99_ms, errors}') leader changes $(( lc1 - lc0 ))"
  stop_all
}

group_lease() { # SYS N: 10,000 leases kept alive by 100 streams
  local sys=$1 n=$2 r0 r1 j ops
  start "$sys" "$n"
  r0=$(raft_index)
  measure "$sys" "$n" "keep-alive, 10000 leases, 100 streams" --clients 100 --conns 10 lease-keepalive --leases "$(scale 10000)" --total "$(scale 100000)"
  r1=$(raft_index)
  ops=$(tail -4 "$results" | head -1 | jq -r .value)
  # Raft entries per renewal: the index growth over the run (grants included) by the renewals.
  record "$sys" "$n" "keep-alive, 10000 leases, 100 streams" "raft entries per renewal" \
    "$(echo "($r1 - $r0 - $(scale 10000)) / $(scale 100000)" | bc -l | awk '{ if ($1 < 0) print 0; else print $1 }')" "entries"
  stop_all
}

group_memory() { # SYS 1: 1,000,000 keys of 256 B: memory after load and after a kill -9 and restart, restart time
  local sys=$1 n=$2 keys bin t0 t1 db
  [ "$n" = 1 ] || return 0
  start "$sys" 1
  keys=$(scale 1000000)
  "$bench" --endpoints "$eps" --clients 100 --conns 10 put --total "$keys" --key-space-size "$keys" --sequential-keys --val-size 256 >/dev/null
  sleep 2
  record "$sys" 1 "$keys keys of 256 B" "resident memory after load" "$(rss_kb "${pids[0]}")" "kB"
  db=$(du -sk "$work/data/m1/member/snap" | awk '{print $1}')
  record "$sys" 1 "$keys keys of 256 B" "backend on disk" "$db" "kB"
  # A crash, not a clean stop: the restart replays what the backend had not made durable.
  kill -KILL "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()
  bin=$(binary "$sys")
  t0=$(date +%s.%N)
  "$bin" --name m1 --data-dir "$work/data/m1" \
    --listen-client-urls "http://127.0.0.1:23790" --advertise-client-urls "http://127.0.0.1:23790" \
    --listen-peer-urls "http://127.0.0.1:23800" --initial-advertise-peer-urls "http://127.0.0.1:23800" \
    --initial-cluster "m1=http://127.0.0.1:23800" --initial-cluster-token bench --quota-backend-bytes 8589934592 \
    >"$work/$sys-restart.log" 2>&1 &
  pids+=($!)
  # Serving: the first Range answered.
  for _ in $(seq 1 6000); do
    if "$bench" --endpoints "$eps" range 00000000 --total 1 >/dev/null 2>&1; then break; fi
    sleep 0.01
  done
  t1=$(date +%s.%N)
  record "$sys" 1 "$keys keys of 256 B" "restart to first served Range" "$(echo "$t1 - $t0" | bc -l)" "s"
  sleep 2
  record "$sys" 1 "$keys keys of 256 B" "resident memory after restart" "$(rss_kb "${pids[0]}")" "kB"
  stop_all
}

if [ -n "${BENCH_TABLE_ONLY:-}" ]; then
  # Only the table, from a results file of earlier runs (JSON lines as `record` writes them).
  results=$BENCH_TABLE_ONLY
  avail=()
  for s in $systems; do grep -q "\"system\":\"$s\"" "$results" && avail+=("$s"); done
  groups=""
fi
for g in $groups; do
  for n in 1 3; do
    for r in $(seq 1 "$runs"); do
      [ "$g" = memory ] && [ "$r" -gt 1 ] && continue
      for s in "${avail[@]}"; do
        "group_$g" "$s" "$n"
      done
    done
  done
done

# The table: one row per (members, workload, metric): each system's mean, and Keel/etcd ratios.
cols=$(printf '%s\n' "${avail[@]}" | jq -R . | jq -sc .)
{
  printf '| members | workload | metric |'
  for s in "${avail[@]}"; do printf ' %s |' "$s"; done
  for s in "${avail[@]}"; do [ "$s" != keel ] && printf ' Keel/%s |' "$s"; done
  echo
  printf '|---|---|---|'
  for s in "${avail[@]}"; do printf -- '---|'; done
  for s in "${avail[@]}"; do [ "$s" != keel ] && printf -- '---|'; done
  echo
  jq -rs --argjson cols "$cols" '
    def r2: . * 100 | round / 100;
    def mean: (add / length);
    group_by([.members, .workload, .metric])[]
    | . as $g
    | ($cols | map(. as $s | [$g[] | select(.system == $s) | .value]) | map(if length == 0 then null else mean end)) as $v
    | ($cols | index("keel")) as $ki
    | "| \($g[0].members) | \($g[0].workload) | \($g[0].metric) (\($g[0].unit)) | "
      + ($v | map(if . == null then "-" else (r2 | tostring) end) | join(" | ")) + " | "
      + ([range(0; $cols | length)] | map(select($cols[.] != "keel"))
         | map(if $ki == null or $v[.] == null or $v[$ki] == null or $v[.] == 0 then "-" else ($v[$ki] / $v[.] | r2 | tostring) + "x" end)
         | join(" | ")) + " |"
  ' "$results"
} | tee "$out"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1024/1024)" GiB"}' /proc/meminfo), $(uname -r); runs per workload: $runs" | tee -a "$out"

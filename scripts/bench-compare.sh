#!/usr/bin/env bash
# Keel vs etcd on this machine, in one run: the same keel-bench workloads against real etcd
# (Debian's etcd-server 3.4.23) and Keel, each workload on fresh data directories (same disk),
# etcd then Keel, workload after workload; 1 member, then 3 members on 127.0.0.1-3.
#
#   scripts/bench-compare.sh [OUT.md]        full run (about 20 minutes)
#   KEEL_BENCH_QUICK=1 scripts/bench-compare.sh   tiny totals (a smoke run, used by CI)
#
# Prints a markdown table of results and Keel/etcd ratios (throughput: higher is better for Keel
# when > 1; latency, memory, time, size: lower is better for Keel when < 1) and writes it to OUT.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/bench/results.md}
work=$root/target/bench
mkdir -p "$work"
quick=${KEEL_BENCH_QUICK:-0}
etcd_bin=${ETCD_BIN:-/usr/bin/etcd}
[ -x "$etcd_bin" ] || { echo "needs $etcd_bin (apt-get install etcd-server)" >&2; exit 1; }
(cd "$root" && cargo build --release --bin keel --bin keel-bench >/dev/null 2>&1)
keel_bin=$root/target/release/keel
bench=$root/target/release/keel-bench
export RUST_BACKTRACE=0

scale() { if [ "$quick" = 1 ]; then echo $(( ($1 + 99) / 100 )); else echo "$1"; fi; }

pids=()
stop_all() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop_all EXIT

# start SYSTEM MEMBERS: starts a fresh cluster; sets $eps (client endpoints) and $pids.
start() {
  local sys=$1 n=$2 bin cluster="" i
  bin=$([ "$sys" = etcd ] && echo "$etcd_bin" || echo "$keel_bin")
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
  for _ in $(seq 1 200); do
    if curl -sf "http://127.0.0.1:23790/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "$sys did not become healthy" >&2
  tail -20 "$work/$sys-m1.log" >&2
  return 1
}

# Ready time: from start of the process to a healthy /health.
ready_time() {
  local t0 t1
  t0=$(date +%s.%N)
  for _ in $(seq 1 3000); do
    if curl -sf "http://127.0.0.1:23790/health" >/dev/null 2>&1; then
      t1=$(date +%s.%N)
      echo "$t1 - $t0" | bc -l
      return
    fi
    sleep 0.01
  done
  echo 0
}

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

results=$work/results.jsonl
: >"$results"
record() { # system members workload metric value unit better(hi|lo)
  printf '{"system":"%s","members":%s,"workload":"%s","metric":"%s","value":%s,"unit":"%s","better":"%s"}\n' "$@" >>"$results"
}

# bench SYS N NAME ARGS...: runs keel-bench, records throughput and p99.
bench_run() {
  local sys=$1 n=$2 name=$3
  shift 3
  local j
  j=$("$bench" --endpoints "$eps" --json "$@")
  record "$sys" "$n" "$name" "throughput" "$(echo "$j" | jq .rps)" "ops/s" hi
  record "$sys" "$n" "$name" "p99 latency" "$(echo "$j" | jq .p99_ms)" "ms" lo
  echo "$sys x$n $name: $(echo "$j" | jq -c '{rps, p50_ms, p99_ms, errors}')"
}

workloads() { # SYS N
  local sys=$1 n=$2
  start "$sys" "$n"; bench_run "$sys" "$n" "put, 1 client" --clients 1 --conns 1 put --total "$(scale 20000)" --key-space-size 100000 --val-size 256; stop_all
  start "$sys" "$n"; bench_run "$sys" "$n" "put, 100 clients" --clients 100 --conns 10 put --total "$(scale 100000)" --key-space-size 100000 --val-size 256; stop_all
  start "$sys" "$n"; bench_run "$sys" "$n" "put, 1000 clients" --clients 1000 --conns 100 put --total "$(scale 100000)" --key-space-size 100000 --val-size 256; stop_all
  start "$sys" "$n"
  "$bench" --endpoints "$eps" --json put --total 1 --key-space-size 1 >/dev/null
  bench_run "$sys" "$n" "range linearizable, 100 clients" --clients 100 --conns 10 range 00000000 --consistency l --total "$(scale 100000)"
  bench_run "$sys" "$n" "range serializable, 100 clients" --clients 100 --conns 10 range 00000000 --consistency s --total "$(scale 100000)"
  stop_all
  start "$sys" "$n"; bench_run "$sys" "$n" "txn-put (1 compare), 100 clients" --clients 100 --conns 10 txn-put --total "$(scale 50000)" --key-space-size 100000 --val-size 256; stop_all
  # Watch: many watchers on one member, puts at 1,000/s; delivery latency and memory per watcher.
  start "$sys" "$n"
  local before after streams wps
  streams=$(( quick == 1 ? 10 : 100 )); wps=$(( quick == 1 ? 10 : 1000 ))
  before=$(rss_kb "${pids[0]}")
  local j
  j=$("$bench" --endpoints "${eps%%,*}" --conns 10 --json watch --streams "$streams" --watchers-per-stream "$wps" --watched-key-total 1000 --put-total "$(scale 5000)" --put-rate 1000)
  after=$(rss_kb "${pids[0]}")
  record "$sys" "$n" "watch ($((streams * wps)) watchers, 1000 puts/s)" "delivery p99" "$(echo "$j" | jq .p99_ms)" "ms" lo
  record "$sys" "$n" "watch ($((streams * wps)) watchers, 1000 puts/s)" "memory per watcher" "$(echo "($after - $before) * 1024 / ($streams * $wps)" | bc)" "bytes" lo
  echo "$sys x$n watch: $(echo "$j" | jq -c '{p50_ms, p99_ms, errors, first_error}') rss $before -> $after kB"
  stop_all
  # Memory, restart time and size with 1,000,000 keys of 256 bytes.
  if [ "$n" = 1 ]; then
    start "$sys" 1
    local keys
    keys=$(scale 1000000)
    "$bench" --endpoints "$eps" --clients 100 --conns 10 --json put --total "$keys" --key-space-size "$keys" --sequential-keys --val-size 256 >/dev/null
    sleep 2
    record "$sys" 1 "$keys keys of 256 B" "resident memory" "$(rss_kb "${pids[0]}")" "kB" lo
    local db
    db=$(du -sk "$work/data/m1/member/snap" | awk '{print $1}')
    record "$sys" 1 "$keys keys of 256 B" "backend on disk" "$db" "kB" lo
    kill -TERM "${pids[0]}"; wait "${pids[0]}" 2>/dev/null || true; pids=()
    local bin
    bin=$([ "$sys" = etcd ] && echo "$etcd_bin" || echo "$keel_bin")
    "$bin" --name m1 --data-dir "$work/data/m1" \
      --listen-client-urls "http://127.0.0.1:23790" --advertise-client-urls "http://127.0.0.1:23790" \
      --listen-peer-urls "http://127.0.0.1:23800" --initial-advertise-peer-urls "http://127.0.0.1:23800" \
      --initial-cluster "m1=http://127.0.0.1:23800" --initial-cluster-token bench --quota-backend-bytes 8589934592 \
      >"$work/$sys-restart.log" 2>&1 &
    pids+=($!)
    record "$sys" 1 "$keys keys of 256 B" "restart to healthy" "$(ready_time)" "s" lo
    stop_all
  fi
}

for n in 1 3; do
  workloads etcd "$n"
  workloads keel "$n"
done

# The table: one row per (members, workload, metric), with the ratio Keel/etcd.
{
  echo "| members | workload | metric | etcd 3.4.23 | Keel | Keel/etcd |"
  echo "|---|---|---|---|---|---|"
  jq -rs '
    group_by([.members, .workload, .metric])[]
    | (map(select(.system=="etcd"))[0]) as $e | (map(select(.system=="keel"))[0]) as $k
    | select($e != null and $k != null)
    | "| \($e.members) | \($e.workload) | \($e.metric) (\($e.unit)) | \($e.value * 100 | round / 100) | \($k.value * 100 | round / 100) | \(if $e.value == 0 then "-" else ($k.value / $e.value * 100 | round / 100 | tostring) + "x" end) |"
  ' "$results"
} | tee "$out"

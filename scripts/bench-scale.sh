#!/usr/bin/env bash
# Keel against etcd 3.7.3 as the data grows (issue 26's matrix), on this machine, in one run.
#
# Each point is a fresh 3-member cluster (members on 127.0.0.1-3, quota raised to 64 GiB) loaded
# through its leader by 100 clients, then measured step by step:
#   load         the load's own rate; every member's resident memory once all hold the data
#   latency      p99 of put (etcd's benchmark tool, random keys of the key space) and of
#                linearizable get (keel-bench, random keys; etcd's tool can read only one key),
#                1 client and 100 clients, through the leader
#   restart      kill -9 of all three members, restart: time to the first linearizable Range
#                served, and resident memory once serving
#   learner      a fourth member added as a learner and started with no data: time until it has
#                the leader's revision, its peak resident memory (VmHWM), and the p99 of a
#                1-client writer on the leader while it catches up, beside the same writer's
#                p99 before
#   snapshot     `etcdctl snapshot save` from the leader: time, the file's size, the leader's
#                resident memory (most seen while saving)
#   compaction   half of the keys written again, then, under a 1-client writer (200 puts/s),
#                a compaction at the current revision (the superseded half goes) and a defragment
#                of each member in turn: the writer's longest and p99 write, the leader changes
#                meanwhile, and how long compaction and each defragment took
#   recompaction a second compaction, at the current revision, under the same writer: the store
#                compacted before (by the compaction step, or here first), so its hash keeps
#                what each key shows from below the first one (Kubernetes compacts every 5
#                minutes): how long it took, the writer's longest and p99 write, failed writes,
#                leader changes
#
# Shapes: "many keys" points of BENCH_SCALE_POINTS GB (1,000,000 keys of 1 KiB per GB) and one
# "big values" point of BENCH_SCALE_BIG keys of 16 KiB. Systems alternate point by point.
#
#   scripts/bench-scale.sh [OUT.md]         the matrix (default points 1 2 5 10, big 1000000)
#   BENCH_SCALE_POINTS="1 2"                 many-keys points, in GB
#   BENCH_SCALE_BIG=100000                   keys of the big-values point (0: none)
#   BENCH_SYSTEMS="etcd-3.7 keel keel-ix"    which systems (default all three; keel-ix: Keel
#                                            with --key-index-memory-bytes BENCH_SCALE_IX_BYTES,
#                                            default 64 MiB)
#   BENCH_SCALE_STEPS="compaction"           which steps after the load (default all: latency
#                                            restart learner snapshot compaction recompaction)
#   BENCH_SCALE_SMOKE=1                      a smoke run: 2,000 keys, 200 big values, few requests
#   BENCH_SCALE_TRACE_SYNCS=1                the compaction step also records every fsync on the
#                                            machine (scripts/trace-syncs.sh; root and perf) and
#                                            reports them in $work/syncs-compaction.txt, beside
#                                            the writer's puts of 40 ms or more (writer-compact.slow)
#   KEEL_BIN=... KEEL_BENCH_BIN=...          measure these builds (no cargo build)
#   BENCH_TABLE_ONLY=results.jsonl           only print the table of an earlier run
#
# Needs: go (etcd's benchmark tool, built once by scripts/bench-etcd-tool.sh's recipe), jq, bc,
# and room on the disk for about six copies of the largest point.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/bench-scale/results.md}
work=$root/target/bench-scale
mkdir -p "$work"
smoke=${BENCH_SCALE_SMOKE:-0}
if [ "$smoke" = 1 ]; then
  points=${BENCH_SCALE_POINTS:-0.002}
  big=${BENCH_SCALE_BIG:-200}
  lat_total=200
  lat_total_many=2000
else
  points=${BENCH_SCALE_POINTS:-1 2 5 10}
  big=${BENCH_SCALE_BIG:-1000000}
  lat_total=3000
  lat_total_many=30000
fi
systems=${BENCH_SYSTEMS:-etcd-3.7 keel keel-ix}
steps=" ${BENCH_SCALE_STEPS:-latency restart learner snapshot compaction recompaction} "
step() { [[ "$steps" == *" $1 "* ]]; }
if [ -z "${KEEL_BIN:-}" ]; then
  (cd "$root" && cargo build --release --bin keel --bin keel-bench >/dev/null 2>&1)
fi
keel_bin=${KEEL_BIN:-$root/target/release/keel}
kbench=${KEEL_BENCH_BIN:-$root/target/release/keel-bench}
ref=$("$root/scripts/etcd-ref.sh" v3.7.3)
ctl=$ref/etcdctl
# etcd's benchmark tool: built (once) by bench-etcd-tool.sh's recipe.
bm=$root/target/etcd-bench/v3.6.8/benchmark
if [ ! -x "$bm" ]; then
  BENCH_ETCD=v3.7.3 BENCH_RUNS=0 KEEL_BIN=$keel_bin "$root/scripts/bench-etcd-tool.sh" >/dev/null
fi
export RUST_BACKTRACE=0
binary() {
  case "$1" in
    keel | keel-ix) echo "$keel_bin" ;;
    etcd-3.7) echo "$ref/etcd" ;;
    *) echo "unknown system $1" >&2; return 1 ;;
  esac
}

results=$work/results.jsonl
[ -n "${BENCH_TABLE_ONLY:-}" ] || : >"$results"
record() { # system shape step metric value unit (an empty value: null, shown as "-")
  set -- "$1" "$2" "$3" "$4" "${5:-null}" "$6"
  printf '{"system":"%s","shape":"%s","step":"%s","metric":"%s","value":%s,"unit":"%s"}\n' "$@" >>"$results"
  printf '%-9s %-22s %-10s %-48s %s %s\n' "$@" >&2
}

pids=()
stop_all() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  pids=()
}
writer_pid=""
cleanup() {
  [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null || true
  stop_all
}
trap cleanup EXIT

cluster="m1=http://127.0.0.1:23800,m2=http://127.0.0.2:23800,m3=http://127.0.0.3:23800"
eps="127.0.0.1:23790,127.0.0.2:23790,127.0.0.3:23790"
# System keel-ix: Keel with its key index kept in the backend, BENCH_SCALE_IX_BYTES of changed
# histories in memory (default 64 MiB; 64 KiB in a smoke run).
# A smoke run's budget is small, so that its few keys are merged in many parts.
if [ "${BENCH_SCALE_SMOKE:-0}" = 1 ]; then ix_default=65536; else ix_default=67108864; fi
ix_flags() { [ "$1" = keel-ix ] && echo "--key-index-memory-bytes ${BENCH_SCALE_IX_BYTES:-$ix_default}" || true; }
# member SYS I [EXTRA FLAGS...]: starts member I (127.0.0.I) on its data directory.
member() {
  local sys=$1 i=$2
  shift 2
  "$(binary "$sys")" --name "m$i" --data-dir "$work/data/m$i" \
    --listen-client-urls "http://127.0.0.$i:23790" --advertise-client-urls "http://127.0.0.$i:23790" \
    --listen-peer-urls "http://127.0.0.$i:23800" --initial-advertise-peer-urls "http://127.0.0.$i:23800" \
    --initial-cluster-token scale --quota-backend-bytes 68719476736 $(ix_flags "$sys") "$@" \
    >>"$work/$sys-m$i.log" 2>&1 &
  pids[$i]=$!
}
. "$root/scripts/bench-lib.sh" # rss_kb, leader_changes
hwm_kb() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# The leader's client endpoint.
leader() {
  { "$ctl" --endpoints "$eps" endpoint status -w json 2>/dev/null || echo '[]'; } |
    jq -r '[.[] | select(.Status.leader == .Status.header.member_id) | .Endpoint][0] // empty'
}
wait_leader() {
  local l
  for _ in $(seq 1 600); do
    l=$(leader)
    [ -n "$l" ] && { echo "$l"; return 0; }
    sleep 0.1
  done
  echo "no leader" >&2
  return 1
}
revision_of() {
  local j
  j=$("$ctl" --endpoints "$1" endpoint status -w json 2>/dev/null) || j='[]'
  jq -r '.[0].Status.header.revision // 0' <<<"$j" 2>/dev/null | head -1
}
# Waits until every listed endpoint reports revision >= $1.
wait_revision() {
  local want=$1 e r ok
  shift
  for _ in $(seq 1 36000); do
    ok=1
    for e in "$@"; do
      r=$(revision_of "$e")
      [ "${r:-0}" -ge "$want" ] || ok=0
    done
    [ "$ok" = 1 ] && return 0
    sleep 0.1
  done
  echo "revision $want not reached" >&2
  return 1
}
now() { date +%s.%N; }
# The blocks the leader's backend file takes on the disk, in KiB (its length, Status' dbSize,
# may be larger: redb grows its file by regions, sparse until used).
disk_kb() { local i=${1#127.0.0.}; du -k "$work/data/m${i%%:*}/member/snap/db" | awk '{print $1}'; }
# calc EXPR: bc's result as a JSON number (4 decimals).
calc() { printf '%.4f' "$(echo "$1" | bc -l)"; }
since() { calc "$(now) - $1"; }
mb() { calc "$1 / 1024"; }
# etcd's benchmark tool's p99 (--precise), in ms, from its report on stdin.
tool_p99() { awk '/99% in/ {print $3 * 1000}' | tail -1; }

# The writer used under compaction and beside the learner: 1 client, 200 puts/s of 1 KiB on 1,000
# keys of its own, in 2-second rounds until $work/stop-writer appears; each round's JSON report
# is kept, named after the phase ($work/writer-phase, set by writer_phase) it began in; each put
# of 40 ms or more is listed in $work/writer-NAME.slow with when it began (Unix seconds).
start_writer() {
  local ep=$1 name=$2
  rm -f "$work/stop-writer" "$work/writer-$name".*.json "$work/writer-$name.slow"
  writer_phase all
  (
    r=0
    while [ ! -e "$work/stop-writer" ]; do
      r=$((r + 1))
      "$kbench" --endpoints "$ep" --json put --total 400 --rate 200 --key-space-size 1000 --key-size 12 --val-size 1024 --slow-ms 40 >"$work/writer-$name.$(cat "$work/writer-phase").$r.json" 2>>"$work/writer-$name.slow" || true
    done
  ) &
  writer_pid=$!
}
writer_phase() { echo "$1" >"$work/writer-phase"; }
stop_writer() {
  touch "$work/stop-writer"
  wait "$writer_pid" 2>/dev/null || true
  writer_pid=""
}
# writer_stat NAME[.PHASE] FIELD: the largest FIELD (max_ms, p99_ms) over the rounds; errors
# summed.
writer_stat() { cat "$work/writer-$1".*.json 2>/dev/null | jq -s "map(.$2) | max // 0"; }
writer_errors() { cat "$work/writer-$1".*.json 2>/dev/null | jq -s 'map(.errors) | add // 0'; }

# point SYS SHAPE KEYS VALUE-BYTES
point() {
  local sys=$1 shape=$2 keys=$3 val=$4 t0 l i lead_pid r0 peak p snap
  echo "== $sys: $shape ($keys keys of $val B)" >&2
  stop_all
  rm -rf "$work/data" "$work"/"$sys"-m*.log
  mkdir -p "$work/data"
  for i in 1 2 3; do member "$sys" "$i" --initial-cluster "$cluster"; done
  l=$(wait_leader)

  # load
  t0=$(now)
  "$kbench" --endpoints "$l" --clients 100 --conns 100 --json put --total "$keys" --key-space-size "$keys" --sequential-keys --val-size "$val" >"$work/load.json"
  wait_revision "$((keys + 1))" ${eps//,/ }
  record "$sys" "$shape" load "load rate (100 clients)" "$(calc "$keys / $(since "$t0")")" "puts/s"
  record "$sys" "$shape" load "backend size (leader's Status dbSize)" "$(mb "$(( $("$ctl" --endpoints "$l" endpoint status -w json | jq '.[0].Status.dbSize') / 1024 ))")" "MiB"
  record "$sys" "$shape" load "backend on disk (leader, du)" "$(mb "$(disk_kb "$l")")" "MiB"
  peak=0
  for i in 1 2 3; do p=$(rss_kb "${pids[$i]}"); [ "$p" -gt "$peak" ] && peak=$p; done
  record "$sys" "$shape" load "resident memory after load (largest member)" "$(mb "$peak")" "MiB"

  # latency
  if step latency; then
    record "$sys" "$shape" latency "put p99, 1 client" \
      "$("$bm" --endpoints "$l" --clients 1 --conns 1 --precise put --total "$lat_total" --key-space-size "$keys" --val-size "$val" 2>/dev/null | tool_p99)" ms
    record "$sys" "$shape" latency "put p99, 100 clients" \
      "$("$bm" --endpoints "$l" --clients 100 --conns 100 --precise put --total "$lat_total_many" --key-space-size "$keys" --val-size "$val" 2>/dev/null | tool_p99)" ms
    record "$sys" "$shape" latency "linearizable get p99, 1 client" \
      "$("$kbench" --endpoints "$l" --json range x --key-space-size "$keys" --total "$lat_total" | jq .p99_ms)" ms
    record "$sys" "$shape" latency "linearizable get p99, 100 clients" \
      "$("$kbench" --endpoints "$l" --clients 100 --conns 100 --json range x --key-space-size "$keys" --total "$lat_total_many" | jq .p99_ms)" ms
  fi

  # restart after kill -9 of every member
  if step restart; then
    r0=$(revision_of "$l")
    for i in 1 2 3; do kill -KILL "${pids[$i]}" 2>/dev/null || true; done
    for i in 1 2 3; do wait "${pids[$i]}" 2>/dev/null || true; done
    pids=()
    t0=$(now)
    for i in 1 2 3; do member "$sys" "$i" --initial-cluster "$cluster"; done
    for _ in $(seq 1 60000); do
      "$kbench" --endpoints 127.0.0.1:23790 --json range x --total 1 2>/dev/null | jq -e '.errors == 0' >/dev/null 2>&1 && break
      sleep 0.01
    done
    record "$sys" "$shape" restart "kill -9 to first linearizable Range" "$(since "$t0")" s
    wait_revision "$r0" ${eps//,/ }
    peak=0
    for i in 1 2 3; do p=$(rss_kb "${pids[$i]}"); [ "$p" -gt "$peak" ] && peak=$p; done
    record "$sys" "$shape" restart "resident memory after restart (largest member)" "$(mb "$peak")" "MiB"
    l=$(wait_leader)
  fi

  # learner catch-up
  if step learner; then
    start_writer "$l" base
    sleep 4
    stop_writer
    start_writer "$l" learner
    # etcd refuses a new member until its peers have been connected for 5 s ("unhealthy cluster").
    for i in $(seq 1 300); do
      "$ctl" --endpoints "$l" member add m4 --learner --peer-urls http://127.0.0.4:23800 >/dev/null 2>&1 && break
      [ "$i" = 300 ] && { echo "member add failed" >&2; return 1; }
      sleep 0.2
    done
    r0=$(revision_of "$l")
    t0=$(now)
    member "$sys" 4 --initial-cluster "$cluster,m4=http://127.0.0.4:23800" --initial-cluster-state existing
    wait_revision "$r0" 127.0.0.4:23790
    record "$sys" "$shape" learner "learner catch-up from nothing" "$(since "$t0")" s
    stop_writer
    record "$sys" "$shape" learner "learner peak resident memory" "$(mb "$(hwm_kb "${pids[4]}")")" MiB
    record "$sys" "$shape" learner "leader write p99 before / while sending" \
      "$(calc "$(writer_stat learner p99_ms) / $(writer_stat base p99_ms)")" x
    kill -TERM "${pids[4]}"; wait "${pids[4]}" 2>/dev/null || true; unset 'pids[4]'
    # (The simple listing: member IDs above 2^53 do not survive jq's numbers.)
    id=$("$ctl" --endpoints "$l" member list | awk -F', ' '$4 == "http://127.0.0.4:23800" {print $1}')
    "$ctl" --endpoints "$l" member remove "$id" >/dev/null
    rm -rf "$work/data/m4"
  fi

  # snapshot save
  if step snapshot; then
    lead_pid=""
    for i in 1 2 3; do [ "$l" = "127.0.0.$i:23790" ] && lead_pid=${pids[$i]}; done
    snap=$work/data/snapshot.db
    rm -f "$snap"
    t0=$(now)
    "$ctl" --endpoints "$l" snapshot save "$snap" >/dev/null 2>&1 &
    p=$!
    peak=$(rss_kb "$lead_pid")
    while kill -0 "$p" 2>/dev/null; do
      i=$(rss_kb "$lead_pid"); [ "$i" -gt "$peak" ] && peak=$i
      sleep 0.1
    done
    wait "$p"
    record "$sys" "$shape" snapshot "snapshot save" "$(since "$t0")" s
    record "$sys" "$shape" snapshot "snapshot file" "$(mb "$(( $(stat -c %s "$snap") / 1024 ))")" MiB
    record "$sys" "$shape" snapshot "leader resident memory while saving (most)" "$(mb "$peak")" MiB
    rm -f "$snap"
  fi

  # compaction and defragment under a writer
  if step compaction; then
    "$kbench" --endpoints "$l" --clients 100 --conns 100 --json put --total "$((keys / 2))" --key-space-size "$((keys / 2))" --sequential-keys --val-size "$val" >/dev/null
    r0=$(revision_of "$l")
    wait_revision "$r0" ${eps//,/ }
    local lc0 tc td dmax=0 d
    lc0=$(leader_changes)
    local tracer=""
    if [ "${BENCH_SCALE_TRACE_SYNCS:-0}" = 1 ]; then
      rm -rf "$work/syncs"
      "$root/scripts/trace-syncs.sh" record "$work/syncs" &
      tracer=$!
    fi
    start_writer "$l" compact
    sleep 2
    t0=$(now)
    writer_phase compaction
    # A step that fails is recorded (its figure then missing) and the run goes on.
    if "$ctl" --endpoints "$l" --command-timeout 3600s compact "$r0" --physical >/dev/null; then tc=$(since "$t0"); else tc=""; fi
    for i in 1 2 3; do
      writer_phase defragment
      t0=$(now)
      if ! "$ctl" --endpoints "127.0.0.$i:23790" --command-timeout 3600s defrag >/dev/null; then dmax=""; break; fi
      d=$(since "$t0")
      [ "$(echo "$d > $dmax" | bc -l)" = 1 ] && dmax=$d
    done
    sleep 2
    stop_writer
    if [ -n "$tracer" ]; then
      kill -INT "$tracer" 2>/dev/null || true
      wait "$tracer" 2>/dev/null || true
      "$root/scripts/trace-syncs.sh" report "$work/syncs" 40 >"$work/syncs-compaction.txt" || true
    fi
    record "$sys" "$shape" compaction "compaction of the superseded half" "$tc" s
    record "$sys" "$shape" compaction "defragment (slowest member)" "$dmax" s
    record "$sys" "$shape" compaction "longest write meanwhile" "$(writer_stat compact max_ms)" ms
    record "$sys" "$shape" compaction "write p99 meanwhile (worst 2 s)" "$(writer_stat compact p99_ms)" ms
    record "$sys" "$shape" compaction "of which in rounds begun while compacting" "$(writer_stat compact.compaction max_ms)" ms
    record "$sys" "$shape" compaction "of which in rounds begun while defragmenting" "$(writer_stat compact.defragment max_ms)" ms
    record "$sys" "$shape" compaction "failed writes meanwhile" "$(writer_errors compact)" ""
    record "$sys" "$shape" compaction "leader changes meanwhile" "$(( $(leader_changes) - lc0 ))" ""
    record "$sys" "$shape" compaction "backend size after defragment (leader's dbSize)" "$(mb "$(( $("$ctl" --endpoints "$l" endpoint status -w json | jq '.[0].Status.dbSize') / 1024 ))")" "MiB"
    record "$sys" "$shape" compaction "backend on disk after defragment (leader, du)" "$(mb "$(disk_kb "$l")")" "MiB"
  fi

  # a second compaction under a writer
  if step recompaction; then
    local lc1 tr
    step compaction || "$ctl" --endpoints "$l" --command-timeout 3600s compact "$(revision_of "$l")" --physical >/dev/null || true
    lc1=$(leader_changes)
    start_writer "$l" recompact
    sleep 2
    t0=$(now)
    if "$ctl" --endpoints "$l" --command-timeout 3600s compact "$(revision_of "$l")" --physical >/dev/null; then tr=$(since "$t0"); else tr=""; fi
    sleep 2
    stop_writer
    record "$sys" "$shape" recompaction "second compaction (physical)" "$tr" s
    record "$sys" "$shape" recompaction "longest write meanwhile" "$(writer_stat recompact max_ms)" ms
    record "$sys" "$shape" recompaction "write p99 meanwhile (worst 2 s)" "$(writer_stat recompact p99_ms)" ms
    record "$sys" "$shape" recompaction "failed writes meanwhile" "$(writer_errors recompact)" ""
    record "$sys" "$shape" recompaction "leader changes meanwhile" "$(( $(leader_changes) - lc1 ))" ""
  fi

  stop_all
  rm -rf "$work/data"
}

avail=()
for s in $systems; do
  b=$(binary "$s")
  if [ -x "$b" ]; then avail+=("$s"); else echo "skipping $s: $b not found" >&2; fi
done
if [ -z "${BENCH_TABLE_ONLY:-}" ]; then
  shapes=()
  for g in $points; do shapes+=("many keys, $g GB|$(echo "$g * 1000000 / 1" | bc)|1024"); done
  [ "$big" -gt 0 ] && shapes+=("big values, $big keys|$big|16384")
  n=0
  for sh in "${shapes[@]}"; do
    IFS='|' read -r name keys val <<<"$sh"
    order=("${avail[@]}")
    # Alternate which system goes first.
    if [ $((n % 2)) = 1 ]; then order=(); for ((i = ${#avail[@]} - 1; i >= 0; i--)); do order+=("${avail[$i]}"); done; fi
    for s in "${order[@]}"; do point "$s" "$name" "$keys" "$val"; done
    n=$((n + 1))
  done
else
  results=$BENCH_TABLE_ONLY
fi

# One table: a row per (shape, step, metric), each system's value and Keel's ratio to etcd.
{
  echo "| shape | step | metric | etcd 3.7.3 | Keel | Keel/etcd | Keel, index in backend | its /etcd |"
  echo "|---|---|---|---|---|---|---|---|"
  jq -rs '
    def r2: . * 100 | round / 100;
    to_entries | map(.value + {n: .key})
    | group_by([.shape, .step, .metric]) | sort_by(map(.n) | min) []
    | . as $g
    | ([$g[] | select(.system == "etcd-3.7") | .value][0]) as $e
    | ([$g[] | select(.system == "keel") | .value][0]) as $k
    | ([$g[] | select(.system == "keel-ix") | .value][0]) as $x
    | "| \($g[0].shape) | \($g[0].step) | \($g[0].metric)\(if $g[0].unit == "" then "" else " (" + $g[0].unit + ")" end) | "
      + (if $e == null then "-" else ($e | r2 | tostring) end) + " | "
      + (if $k == null then "-" else ($k | r2 | tostring) end) + " | "
      + (if $e == null or $k == null or $e == 0 then "-" else ($k / $e | r2 | tostring) + "x" end) + " | "
      + (if $x == null then "-" else ($x | r2 | tostring) end) + " | "
      + (if $e == null or $x == null or $e == 0 then "-" else ($x / $e | r2 | tostring) + "x" end) + " |"
  ' "$results"
} | tee "$out"
if [ "$smoke" = 1 ] && jq -e 'select(.value == null)' "$results" >/dev/null; then
  echo "bench-scale: a step gave no figure:" >&2
  jq -c 'select(.value == null)' "$results" >&2
  exit 1
fi
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {print int($2/1024/1024)" GiB"}' /proc/meminfo), $(uname -r); disk: $(df -h "$work" | awk 'NR==2 {print $2}')" | tee -a "$out"

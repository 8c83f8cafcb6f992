#!/usr/bin/env bash
# The fault-injection harness in one command: builds Keel with its crash points (the `fail`
# crate, `--features failpoints`) and keel-chaos, then runs it.
#
#   scripts/chaos.sh        the short schedule (CI, a few minutes): 3 histories of 40 s on 3, 5
#                           and 3 members with every kind of fault, paused leaders and their
#                           negative control (reads served unconfirmed), then 25 crash-loop iterations
#                           with power cuts, 25 with disk faults, 10 at size (20,000 keys
#                           preloaded: cuts inside compactions and defragments; 10 more with 2,000
#                           values of 16 KiB), a power-cut history, the
#                           same at-size loop and a power-cut history with the key index kept in the
#                           backend (ETCD_KEY_INDEX_MEMORY_BYTES=4096), the targeted points and the
#                           negative control (without /dev/fuse: 25 plain crash-loop iterations, 10 at
#                           size with the index in the backend, and the points); one mixed history: an
#                           etcd 3.6.16 member and two Keel members
#   scripts/chaos.sh run --etcd "$(scripts/etcd-ref.sh v3.6.16)/etcd" --etcd-members 2 --members 3
#                           mixed clusters: the first two members of each history run etcd
#   scripts/chaos.sh run --histories 200 --duration 40 --members 3,5 --total-seconds 7200
#                           the long run (histories: real clusters on 127.0.0.x, random faults,
#                           recorded clients and watchers, linearizability/watch/durability checks)
#   scripts/chaos.sh crash-loop --iterations 1000
#                           one member SIGKILLed (or crashed at a crash point) 1,000 times
#   scripts/chaos.sh crash-loop --iterations 500 --power target/release/keel-powerfs [--disk-faults]
#                           the same on a power-loss filesystem: a power cut after every kill
#                           (and with --disk-faults a random EIO/ENOSPC fault in every iteration)
#   scripts/chaos.sh crash-loop --iterations 100 --power target/release/keel-powerfs --preload 500000
#                           at size: 500,000 keys of 1 KiB written twice first (--preload-value-size),
#                           then every kill and cut lands in a compaction or defragment of them
#   scripts/chaos.sh run --histories 10 --keys 20 --faults power,power-all,kill,compact,crash \
#                        --power target/release/keel-powerfs
#                           3-member clusters with power cuts of one member and of all of them
#   scripts/chaos.sh points [--power target/release/keel-powerfs]
#                           the lease-revoke and snapshot-restore apply paths crashed at their
#                           crash points (then power-cut), each restart checked
#   scripts/chaos.sh check target/chaos/hNNNN-SEED/history.json
#                           checks a kept history again
#
# Histories of failing runs keep their data dirs, history.json and report.txt under
# target/chaos; the exit status is 1 on any violation. `keel-chaos help run` lists every option.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -p keel-chaos -p keel-powerfs
# The crash points are compiled into this build of the server only.
cargo build --release --bin keel --features keel/failpoints
chaos=target/release/keel-chaos
powerfs=target/release/keel-powerfs
if [ $# -eq 0 ]; then
  "$chaos" run --histories 3 --duration 40 --members 3,5
  # Paused members (a leader SIGSTOPped across an election, SIGCONT with reads in flight) must
  # not serve a stale read; the negative control: with members answering reads at their own
  # commit index (no ReadIndex round), the checker must find one.
  "$chaos" run --histories 1 --duration 30 --members 3 --faults pause,pause-leader --out target/chaos/pause
  # A stale read needs a paused leader to answer a read after a newer leader took a write: a
  # 30 s history makes one by chance (one in CI on f42278c did not), so up to three are run, and
  # the control passes at the first one caught.
  caught=0
  for attempt in 1 2 3; do
    rc=0
    "$chaos" run --histories 1 --duration 30 --members 3 --faults pause,pause-leader --always 'raft::read_index_local=return' \
      --out target/chaos/negative-reads || rc=$?
    if [ "$rc" -eq 1 ]; then
      caught=1
      break
    fi
    if [ "$rc" -ne 0 ]; then
      echo "chaos: the stale-read negative control did not run (exit $rc)" >&2
      exit 1
    fi
    echo "chaos: stale-read negative control: history $attempt of 3 found no stale read"
  done
  if [ "$caught" -ne 1 ]; then
    echo "chaos: the negative control (reads served unconfirmed) was not caught in 3 histories" >&2
    exit 1
  fi
  echo "chaos: stale-read negative control caught, as it must be"
  # A mixed cluster: one etcd 3.6.16 member beside two Keel members, in one cluster over etcd's
  # peer protocol, under every fault but the quota one (crash points go to Keel members only).
  # etcd answers some writes it applied with NOSPACE, so under the quota fault its clients'
  # writes have unknown outcomes by the hundred and the check runs out of budget.
  etcd_bin=$(scripts/etcd-ref.sh v3.6.16)/etcd
  "$chaos" run --histories 1 --duration 40 --members 3 --etcd "$etcd_bin" --etcd-members 1 \
    --faults kill,kill-leader,pause,pause-leader,partition,partition-leader,bridge,delay,drop,membership,compact,crash
  # keel-powerfs needs root and /dev/fuse; a mount that fails here skips these runs, saying so.
  fuse_ok() {
    local d rc=0
    d=$(mktemp -d)
    echo quit | timeout 20 "$powerfs" "$d" >/dev/null 2>&1 || rc=$?
    rmdir "$d" 2>/dev/null || true
    [ "$rc" -eq 0 ]
  }
  if [ -e /dev/fuse ] && [ "$(id -u)" -eq 0 ] && fuse_ok; then
    # Power cuts and failing disks (data dirs on keel-powerfs, see crates/keel-powerfs). The
    # power-cut loop is the plain crash loop (SIGKILLs, crash points) with a cut after each.
    "$chaos" crash-loop --iterations 25 --power "$powerfs"
    "$chaos" crash-loop --iterations 25 --power "$powerfs" --disk-faults
    # At size: 20,000 keys of 1 KiB written twice first, then kills, crash points and power cuts
    # inside compactions and defragments of that backend (issue 26).
    "$chaos" crash-loop --iterations 10 --power "$powerfs" --preload 20000 --out target/chaos/at-size
    # The same with 16 KiB values, each record stored as page-sized parts (keel-mvcc parts.rs):
    # cuts inside compactions and defragments that delete and copy parts.
    "$chaos" crash-loop --iterations 10 --power "$powerfs" --preload 2000 --preload-value-size 16384 --out target/chaos/big-at-size
    "$chaos" run --histories 1 --duration 40 --members 3 --keys 20 --faults power,power-all,kill,compact --power "$powerfs"
    # The key index kept in the backend with a 4 KiB budget (a merge every few batches): the
    # same at-size loop and a history with power cuts, each member merging all along.
    ETCD_KEY_INDEX_MEMORY_BYTES=4096 "$chaos" crash-loop --iterations 10 --power "$powerfs" --preload 20000 --out target/chaos/ix-at-size
    ETCD_KEY_INDEX_MEMORY_BYTES=4096 "$chaos" run --histories 1 --duration 30 --members 3 --keys 20 \
      --faults power,power-all,kill,compact,crash --power "$powerfs" --out target/chaos/ix-run
    # The lease-revoke and snapshot-restore apply paths driven to their crash points, each crash
    # followed by a power cut.
    "$chaos" points --power "$powerfs"
    # The negative control: a server that skips the WAL's fsync must be caught losing writes.
    rc=0
    "$chaos" crash-loop --iterations 25 --power "$powerfs" --always 'wal::skip_fsync=return' --out target/chaos/negative || rc=$?
    if [ "$rc" -ne 1 ]; then
      echo "chaos: the negative control (WAL fsync skipped) was not caught (exit $rc)" >&2
      exit 1
    fi
    echo "chaos: negative control caught, as it must be"
  else
    echo "chaos: power-cut and disk-fault runs SKIPPED (they need root and a working /dev/fuse)"
    "$chaos" crash-loop --iterations 25
    ETCD_KEY_INDEX_MEMORY_BYTES=4096 "$chaos" crash-loop --iterations 10 --preload 20000 --out target/chaos/ix-at-size
    "$chaos" points
  fi
else
  exec "$chaos" "$@"
fi

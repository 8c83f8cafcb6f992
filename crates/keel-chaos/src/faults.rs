//! Faults, one at a time in a random schedule: SIGKILL and restart, SIGSTOP/SIGCONT longer than
//! the election timeout, partitions (one member isolated, the leader isolated, majority/minority,
//! a bridge), delayed links, cut connections, membership changes (remove a member, add a fresh
//! one), compaction and defragment under load, and crash points inside Keel (the `fail` crate,
//! in a `--features failpoints` build), power cuts of one or all members and a failing disk under one member (a
//! run with `--power`: data dirs on keel-powerfs, see [`crate::powerfs`]).

use crate::cluster::{channel, Cluster};
use crate::history::FaultRecord;
use crate::workload::Shared;
use anyhow::Result;
use keel_proto::etcdserverpb::alarm_request::AlarmAction;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{AlarmRequest, AlarmType, CompactionRequest, DefragmentRequest, DeleteRangeRequest, PutRequest};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const ALL: &[&str] = &[
    "kill",
    "kill-leader",
    "pause",
    "pause-leader",
    "partition",
    "partition-leader",
    "bridge",
    "delay",
    "drop",
    "membership",
    "compact",
    "quota",
    "crash",
    "power",
    "power-all",
    "disk",
];

/// Every member's backend quota in a harness cluster (the `quota` fault fills it).
pub const QUOTA_BYTES: u64 = 64 * 1024 * 1024;

/// Crash points compiled into Keel with `--features failpoints` (see `keel_wal::crash_point!`).
pub const CRASH_POINTS: &[&str] = &[
    "wal::before_fsync",
    "wal::after_fsync",
    "wal::cut",
    "snap::save",
    "raft::install_snapshot",
    "backend::before_commit",
    "backend::after_commit",
    "mvcc::compact",
    "mvcc::defrag",
    "apply::lease_revoke",
    "apply::restore",
    // Not a crash: a backend error after a write's first change; the member rolls back and stops.
    "mvcc::write_error",
];

/// Injects one fault of `kind`, holds it, heals it. Returns what was done.
pub async fn inject(kind: &str, c: &mut Cluster, shared: &Shared, rng: &mut StdRng) -> Result<FaultRecord> {
    let start = shared.now();
    let hold = Duration::from_millis(rng.gen_range(1500..4000));
    let ids = c.ids();
    let pick = |rng: &mut StdRng| *ids.choose(rng).expect("a cluster has members");
    let leader = c.leader().await;
    let detail: String = match kind {
        "kill" | "kill-leader" => {
            let m = if kind == "kill-leader" { leader.unwrap_or_else(|| pick(rng)) } else { pick(rng) };
            c.kill(m);
            tokio::time::sleep(hold).await;
            c.restart(m, None)?;
            format!("SIGKILL m{m} for {hold:?}")
        }
        "pause" | "pause-leader" => {
            let m = if kind == "pause-leader" { leader.unwrap_or_else(|| pick(rng)) } else { pick(rng) };
            c.signal(m, libc::SIGSTOP);
            tokio::time::sleep(hold).await;
            c.signal(m, libc::SIGCONT);
            format!("SIGSTOP m{m} for {hold:?}")
        }
        "partition" | "partition-leader" => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(rng);
            let minority = (ids.len() - 1) / 2;
            let size = rng.gen_range(1..=minority.max(1));
            let mut a: Vec<usize> = shuffled[..size].to_vec();
            if kind == "partition-leader" {
                if let Some(l) = leader {
                    a = vec![l];
                }
            }
            let b: Vec<usize> = ids.iter().copied().filter(|i| !a.contains(i)).collect();
            c.net.partition(&a, &b);
            tokio::time::sleep(hold).await;
            c.net.heal();
            format!("partition {a:?} | {b:?} for {hold:?}")
        }
        "bridge" => {
            // Two sides that only one member (the bridge) talks to both of.
            let mut shuffled = ids.clone();
            shuffled.shuffle(rng);
            let bridge = shuffled[0];
            let rest = &shuffled[1..];
            let (l, r) = rest.split_at(rest.len() / 2);
            c.net.partition(l, r);
            tokio::time::sleep(hold).await;
            c.net.heal();
            format!("bridge m{bridge} between {l:?} and {r:?} for {hold:?}")
        }
        "delay" => {
            let ms = rng.gen_range(20..200);
            c.net.set_delay(ms);
            tokio::time::sleep(hold).await;
            c.net.heal();
            format!("peer links delayed {ms} ms for {hold:?}")
        }
        "drop" => {
            let rate = rng.gen_range(50..500);
            c.net.set_cut_rate(rate);
            tokio::time::sleep(hold).await;
            c.net.heal();
            format!("peer connections cut at {:.1}% of chunks for {hold:?}", rate as f64 / 100.0)
        }
        "membership" => {
            let followers: Vec<usize> = ids.iter().copied().filter(|i| Some(*i) != leader).collect();
            let Some(&victim) = followers.choose(rng) else { return Ok(skip(kind, start, shared)) };
            set_members(shared, c.ids().into_iter().filter(|i| *i != victim).collect());
            c.remove_member(victim).await?;
            // The new member is of the removed one's kind: a mixed cluster stays as mixed.
            let added = c.add_member(c.is_etcd(victim)).await?;
            if c.is_etcd(added) {
                shared.etcd.lock().push(added);
            }
            c.wait_healthy(added, Duration::from_secs(30)).await?;
            set_members(shared, c.ids());
            format!("removed m{victim}, added m{added}")
        }
        "compact" => {
            // Never beyond what every watcher has received: watchers resume from there.
            let floor = shared.watcher_revs.lock().iter().copied().min().unwrap_or(0);
            let m = pick(rng);
            let mut d = format!("defragment m{m}");
            if floor > 1 {
                let mut kv = KvClient::new(channel(m, c.base)?);
                let r =
                    tokio::time::timeout(Duration::from_secs(5), kv.compact(CompactionRequest { revision: floor, physical: true })).await;
                if matches!(r, Ok(Ok(_))) {
                    d = format!("compact at {floor} on m{m}, {d}");
                }
            }
            let mut mc = MaintenanceClient::new(channel(m, c.base)?);
            let r = tokio::time::timeout(Duration::from_secs(30), mc.defragment(DefragmentRequest {})).await;
            if !matches!(r, Ok(Ok(_))) {
                d.push_str(" (failed)");
            }
            d
        }
        "quota" => quota(c, shared, rng, hold).await?,
        "crash" => {
            // Crash points are Keel's: an etcd member is never picked.
            let keel: Vec<usize> = ids.iter().copied().filter(|&i| !c.is_etcd(i)).collect();
            let Some(&m) = keel.choose(rng) else { return Ok(skip(kind, start, shared)) };
            let point = *CRASH_POINTS.choose(rng).expect("crash points");
            let pct = rng.gen_range(1..=20);
            c.kill(m);
            c.restart(m, Some(&format!("{point}={pct}%return")))?;
            tokio::time::sleep(hold).await;
            let crashed = !c.is_running(m);
            c.kill(m);
            c.restart(m, None)?;
            format!("m{m} restarted with {point} at {pct}%: {}", if crashed { "crashed there" } else { "did not reach it" })
        }
        // Power cuts (a run with --power): one member, or every member at once.
        "power" | "power-all" if c.has_power() => {
            let victims = if kind == "power" { vec![pick(rng)] } else { ids.clone() };
            let mut said = Vec::new();
            for &m in &victims {
                said.push(format!("m{m}: {}", c.power_cut(m)?));
            }
            tokio::time::sleep(hold).await;
            for &m in &victims {
                c.restart(m, None)?;
            }
            format!("power cut {} for {hold:?} ({})", if kind == "power" { "one member" } else { "all members" }, said.join(", "))
        }
        "power" | "power-all" => return Ok(skip(kind, start, shared)),
        // A failing disk under one member (a run with --power): EIO on write, fsync or read, or
        // ENOSPC, for the hold; a member it stopped is started again once the fault is gone
        // (after a power cut: a failed fsync lost its pages), and must catch up.
        "disk" if c.has_power() => {
            let m = pick(rng);
            let cmd = match rng.gen_range(0..4) {
                0 => format!("fault write eio {:.1}%", rng.gen_range(0.5..5.0)),
                1 => format!("fault fsync eio {}", rng.gen_range(1..3)),
                2 => format!("fault read eio {:.1}%", rng.gen_range(0.5..5.0)),
                _ => format!("fault write enospc {:.1}%", rng.gen_range(0.5..5.0)),
            };
            c.disk_command(m, &cmd)?;
            tokio::time::sleep(hold).await;
            c.disk_command(m, "clear")?;
            let stopped = !c.is_running(m);
            if stopped {
                c.power_cut(m)?;
                c.restart(m, None)?;
            }
            format!("m{m}: {cmd} for {hold:?}: {}", if stopped { "it stopped; power cut, restarted" } else { "it kept running" })
        }
        "disk" => return Ok(skip(kind, start, shared)),
        other => anyhow::bail!("unknown fault {other}"),
    };
    Ok(FaultRecord { kind: kind.to_string(), detail, start, end: shared.now() })
}

/// Fills the backend until the NOSPACE alarm, holds it (clients' writes are refused), then does
/// what an operator does: delete the filler, compact, defragment every member, disarm.
async fn quota(c: &mut Cluster, shared: &Shared, rng: &mut StdRng, hold: Duration) -> Result<String> {
    let ids = c.ids();
    let m = *ids.choose(rng).expect("a cluster has members");
    let mut kv = KvClient::new(channel(m, c.base)?);
    let big = vec![b'x'; 512 * 1024];
    let (mut n, mut full) = (0usize, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !full {
        let put = PutRequest { key: format!("/fill/{n:06}").into(), value: big.clone(), ..Default::default() };
        match tokio::time::timeout(Duration::from_secs(5), kv.put(put)).await {
            Ok(Ok(_)) => n += 1,
            Ok(Err(e)) if e.message().contains("database space exceeded") => full = true,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tokio::time::sleep(hold).await;
    // Free the space.
    let mut del_rev = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let del = DeleteRangeRequest { key: b"/fill/".to_vec(), range_end: b"/fill0".to_vec(), ..Default::default() };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), kv.delete_range(del)).await {
            del_rev = r.into_inner().header.map(|h| h.revision).unwrap_or(0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Compaction stays below what every watcher has (they send progress requests).
    let deadline = Instant::now() + Duration::from_secs(10);
    let floor = loop {
        let floor = shared.watcher_revs.lock().iter().copied().min().unwrap_or(0);
        if floor >= del_rev || Instant::now() > deadline {
            break floor;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if floor > 1 {
        let _ = tokio::time::timeout(Duration::from_secs(10), kv.compact(CompactionRequest { revision: floor, physical: true })).await;
    }
    for i in c.ids() {
        let mut mc = MaintenanceClient::new(channel(i, c.base)?);
        let _ = tokio::time::timeout(Duration::from_secs(30), mc.defragment(DefragmentRequest {})).await;
    }
    let mut mc = MaintenanceClient::new(channel(m, c.base)?);
    let get = AlarmRequest { action: AlarmAction::Get as i32, member_id: 0, alarm: AlarmType::None as i32 };
    let mut disarmed = 0;
    if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), mc.alarm(get)).await {
        for a in r.into_inner().alarms {
            let off = AlarmRequest { action: AlarmAction::Deactivate as i32, member_id: a.member_id, alarm: a.alarm };
            if matches!(tokio::time::timeout(Duration::from_secs(5), mc.alarm(off)).await, Ok(Ok(_))) {
                disarmed += 1;
            }
        }
    }
    Ok(format!(
        "filled m{m} with {n} x 512 KiB ({}), deleted at {del_rev}, compacted at {floor}, defragmented, {disarmed} alarm(s) disarmed",
        if full { "NOSPACE raised" } else { "quota not reached" }
    ))
}

fn skip(kind: &str, start: u64, shared: &Shared) -> FaultRecord {
    FaultRecord { kind: kind.to_string(), detail: "skipped (no candidate)".into(), start, end: shared.now() }
}

fn set_members(shared: &Shared, ids: Vec<usize>) {
    *shared.members.lock() = ids;
}

/// The schedule: faults one after another, with quiet gaps, until `stop`.
pub async fn schedule(c: &mut Cluster, shared: &Shared, kinds: &[String], rng: &mut StdRng, until: std::time::Instant) -> Vec<FaultRecord> {
    let mut done = Vec::new();
    while std::time::Instant::now() < until && !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
        let Some(kind) = kinds.choose(rng) else { break };
        match inject(kind, c, shared, rng).await {
            Ok(r) => {
                println!("  fault {:>16}: {}", r.kind, r.detail);
                done.push(r);
            }
            Err(e) => {
                println!("  fault {kind:>16}: could not inject: {e:#}");
                // Leave the cluster whole before the next one.
                let _ = c.heal_all();
            }
        }
    }
    done
}

//! Targeted crash points: drives the two apply paths a random schedule seldom reaches to their
//! crash points (Keel built with `--features failpoints`) and checks what the restart shows.
//!
//! - `apply::lease_revoke`: the members of a 3-member cluster crash while applying a lease
//!   revoke, after the lease's keys were deleted in the store and before the lease is gone.
//!   After the restart the revoke is there whole on every member: one revision after the last
//!   write, every key gone in it (a watch from it shows exactly those deletes), the lease gone.
//! - `apply::restore`: a follower that fell behind the leader's log (it was down while the
//!   leader snapshotted and let the entries go) crashes after the leader's backend was moved into
//!   place and before the raft snapshot was saved. It starts again from that backend and catches
//!   up: the leader's revision, every key, the same HashKV.
//!
//! With `power`, each crash is followed by a power cut of the crashed members. Uses
//! [`crate::cluster`] only.

use crate::cluster::{channel, client_url, Cluster};
use crate::proxy::Net;
use anyhow::{bail, Context, Result};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{
    HashKvRequest, LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, StatusRequest,
    WatchCreateRequest, WatchRequest,
};
use keel_proto::mvccpb::event::EventType;
use std::path::Path;
use std::time::{Duration, Instant};

/// Keys the lease carries.
const LEASE_KEYS: usize = 5;
/// Writes made while the follower is down (the leader snapshots every 100 and keeps 10).
const BEHIND_WRITES: usize = 300;

/// Runs both scenarios on fresh clusters under `out`; returns what each showed.
pub async fn run(keel: &Path, power: Option<&Path>, out: &Path, base: u16) -> Result<Vec<String>> {
    let extra: Vec<String> =
        ["--heartbeat-interval", "100", "--election-timeout", "1000", "--snapshot-count", "100", "--snapshot-catchup-entries", "10"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut said = Vec::new();
    let mut c = Cluster::start(keel, &out.join("lease-revoke"), base, 3, Net::new(1), extra.clone(), power).await?;
    let r = lease_revoke(&mut c).await;
    c.shutdown().await;
    said.push(r.context("apply::lease_revoke")?);
    let mut c = Cluster::start(keel, &out.join("restore"), base, 3, Net::new(2), extra, power).await?;
    let r = restore(&mut c).await;
    c.shutdown().await;
    said.push(r.context("apply::restore")?);
    Ok(said)
}

/// Waits until `i` has exited on its own (it reached its crash point), up to `limit`.
async fn exits(c: &mut Cluster, i: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !c.is_running(i) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Ends a member that crashed (or is still running): with power-loss disks, a power cut.
fn end(c: &mut Cluster, i: usize) -> Result<()> {
    if c.has_power() {
        c.power_cut(i)?;
    } else {
        c.kill(i);
    }
    Ok(())
}

/// Starts every member again without crash points and waits until each is healthy.
async fn restart_all(c: &mut Cluster) -> Result<()> {
    for i in c.ids() {
        c.restart(i, None)?;
    }
    for i in c.ids() {
        c.wait_healthy(i, Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// A leader's index, waiting for one.
async fn leader(c: &Cluster) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = c.leader().await {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("no leader after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lease_revoke(c: &mut Cluster) -> Result<String> {
    let base = c.base;
    let l = leader(c).await?;
    let id = LeaseClient::new(channel(l, base)?).lease_grant(LeaseGrantRequest { ttl: 600, id: 0 }).await?.into_inner().id;
    let mut kv = KvClient::new(channel(l, base)?);
    let mut rev = 0;
    for k in 0..LEASE_KEYS {
        let put = PutRequest { key: format!("/points/lease/{k}").into(), value: b"v".to_vec(), lease: id, ..Default::default() };
        rev = kv.put(put).await?.into_inner().header.map_or(0, |h| h.revision);
    }
    // Every member armed: whichever applies the revoke crashes there.
    for i in c.ids() {
        c.kill(i);
        c.restart(i, Some("apply::lease_revoke=return"))?;
    }
    for i in c.ids() {
        c.wait_healthy(i, Duration::from_secs(30)).await?;
    }
    let l = leader(c).await?;
    // Its answer cannot come: the leader crashes applying it.
    let _ = LeaseClient::new(channel(l, base)?).lease_revoke(LeaseRevokeRequest { id }).await;
    if !exits(c, l, Duration::from_secs(20)).await {
        bail!("the leader m{l} did not reach apply::lease_revoke");
    }
    let mut crashed = 1;
    for i in c.ids().into_iter().filter(|&i| i != l) {
        // The others apply it once they learn it is committed, which a new leader tells them.
        if exits(c, i, Duration::from_secs(10)).await {
            crashed += 1;
        }
    }
    for i in c.ids() {
        end(c, i)?;
    }
    restart_all(c).await?;
    let want = rev + 1;
    for i in c.ids() {
        let ch = channel(i, base)?;
        // The revoke is committed (the leader applied it), so it is there whole once a read
        // barrier has passed: a linearizable read first, then this member's own state.
        let lin = KvClient::new(ch.clone()).range(prefix(b"/points/lease/", false)).await?.into_inner();
        let r = KvClient::new(ch.clone()).range(prefix(b"/points/lease/", true)).await?.into_inner();
        let got = r.header.map_or(0, |h| h.revision);
        if lin.count != 0 || r.count != 0 || got != want {
            bail!(
                "m{i} after the restart: {} keys of the revoked lease left, revision {got} (want 0 keys at revision {want})",
                r.count.max(lin.count)
            );
        }
        let ttl = LeaseClient::new(ch.clone()).lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }).await?.into_inner().ttl;
        if ttl != -1 {
            bail!("m{i}: the revoked lease is still there (TTL {ttl})");
        }
        let deletes = deletes_at(ch, want).await?;
        if deletes != LEASE_KEYS {
            bail!("m{i}: a watch from revision {want} shows {deletes} deletes of the lease's keys at it (want {LEASE_KEYS})");
        }
    }
    Ok(format!(
        "apply::lease_revoke: {crashed} of 3 members crashed applying the revoke{}; after the restart every member has it whole at revision {want} ({LEASE_KEYS} deletes, lease gone)",
        if c.has_power() { " (each then power-cut)" } else { "" }
    ))
}

/// Every key under `p` (which ends in '/'), serializable or not.
fn prefix(p: &[u8], serializable: bool) -> RangeRequest {
    let mut end = p.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    RangeRequest { key: p.to_vec(), range_end: end, serializable, ..Default::default() }
}

/// How many DELETE events of `/points/lease/` a watch from `rev` shows at `rev` (its first
/// response; later revisions would be past what the scenario wrote).
async fn deletes_at(ch: tonic::transport::Channel, rev: i64) -> Result<usize> {
    let create = WatchCreateRequest {
        key: b"/points/lease/".to_vec(),
        range_end: b"/points/lease0".to_vec(),
        start_revision: rev,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await?;
    let mut out = WatchClient::new(ch).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let deadline = Duration::from_secs(10);
    loop {
        let r = tokio::time::timeout(deadline, out.message()).await.context("no watch event in 10 s")??.context("the watch ended")?;
        if r.events.is_empty() {
            continue;
        }
        let ok = r.events.iter().all(|e| e.r#type == EventType::Delete as i32 && e.kv.as_ref().is_some_and(|k| k.mod_revision == rev));
        if !ok {
            bail!("events other than deletes at revision {rev}: {:?}", r.events);
        }
        return Ok(r.events.len());
    }
}

/// The first entry of member `i`'s in-memory raft log (its `keel_raft_log_first_index`
/// gauge, read from /metrics on its client URL).
async fn log_first_index(i: usize, base: u16) -> Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = client_url(i, base).trim_start_matches("http://").to_string();
    let mut conn =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&addr)).await.context("connecting for /metrics")??;
    conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut body)).await.context("reading /metrics")??;
    let line = body.lines().find(|l| l.starts_with("keel_raft_log_first_index ")).context("no keel_raft_log_first_index in /metrics")?;
    let v: f64 = line.split_whitespace().nth(1).context("an empty gauge line")?.parse()?;
    Ok(v as u64)
}

async fn restore(c: &mut Cluster) -> Result<String> {
    let base = c.base;
    let l = leader(c).await?;
    let f = c.ids().into_iter().find(|&i| i != l).context("a follower")?;
    c.kill(f);
    // What the stopped follower can hold: no entry past the leader's index now.
    let held = MaintenanceClient::new(channel(l, base)?).status(StatusRequest {}).await?.into_inner().raft_index;
    let mut kv = KvClient::new(channel(l, base)?);
    for k in 0..BEHIND_WRITES {
        kv.put(PutRequest { key: format!("/points/restore/{k:04}").into(), value: format!("v{k}").into(), ..Default::default() }).await?;
    }
    // The leader keeps the entries a follower lacks until it has not heard from it for an
    // election timeout, and trims its log every 100 applied entries: writes (of other keys) go
    // on until its log no longer holds the entry the follower needs next, so that only a
    // snapshot can catch it up (the writes above can all fit in that timeout on a fast machine).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut filler = 0;
    while log_first_index(l, base).await? <= held + 1 {
        if Instant::now() > deadline {
            bail!("the leader m{l} kept its log for the stopped m{f} (it still holds entry {}, the next it needs)", held + 1);
        }
        for _ in 0..20 {
            kv.put(PutRequest { key: format!("/points/filler/{filler:05}").into(), value: b"f".to_vec(), ..Default::default() }).await?;
            filler += 1;
        }
    }
    c.restart(f, Some("apply::restore=return"))?;
    if !exits(c, f, Duration::from_secs(30)).await {
        bail!("m{f} did not reach apply::restore (no snapshot from the leader?)");
    }
    end(c, f)?;
    c.restart(f, None)?;
    c.wait_healthy(f, Duration::from_secs(30)).await?;
    let l = leader(c).await?;
    let lr = KvClient::new(channel(l, base)?).range(prefix(b"/points/restore/", false)).await?.into_inner();
    let want = lr.header.map_or(0, |h| h.revision);
    // The follower catches up to the leader's revision (no write goes on meanwhile).
    let deadline = Instant::now() + Duration::from_secs(30);
    let fr = loop {
        let r = KvClient::new(channel(f, base)?).range(prefix(b"/points/restore/", true)).await?.into_inner();
        if r.header.as_ref().is_some_and(|h| h.revision >= want) {
            break r;
        }
        if Instant::now() > deadline {
            bail!("m{f} did not catch up to revision {want} in 30 s (at {:?})", r.header.map(|h| h.revision));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if fr.count as usize != BEHIND_WRITES || fr.kvs != lr.kvs {
        bail!("m{f} has {} keys after its restore, the leader {} (or their values differ)", fr.count, lr.count);
    }
    let hash = |i| async move {
        Ok::<_, anyhow::Error>(MaintenanceClient::new(channel(i, base)?).hash_kv(HashKvRequest { revision: want }).await?.into_inner().hash)
    };
    let (hf, hl) = (hash(f).await?, hash(l).await?);
    if hf != hl {
        bail!("HashKV at revision {want}: m{f} {hf:#x}, leader m{l} {hl:#x}");
    }
    Ok(format!(
        "apply::restore: m{f} crashed after moving the leader's backend into place{}; it started from it and caught up to revision {want} ({BEHIND_WRITES} keys, HashKV equal to the leader's)",
        if c.has_power() { " (then power-cut)" } else { "" }
    ))
}

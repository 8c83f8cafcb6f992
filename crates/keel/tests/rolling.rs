//! Rolling migration between etcd 3.6.16 and Keel with the cluster serving, as an operator
//! upgrades etcd: a member of the other kind is added as a learner (`member add --learner`),
//! started with `--initial-cluster-state existing`, promoted, and a member of the first kind is
//! removed; until none of the first kind is left. A writer and a watcher run throughout.
//! Checked at every step: every member's HashKV is equal at one revision; at the end: every
//! acknowledged write is there, the watch saw every write once, in revision order, with no
//! `compacted` error, continuing across the members it was moved between.
//!
//! Needs etcd 3.6.16 (`scripts/etcd-ref.sh`), or the release `KEEL_ROLLING_ETCD` names; skipped
//! only when `KEEL_SKIP_ETCD_ORACLE=1`.

mod common;

use common::*;
use keel_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::{
    watch_request, DowngradeRequest, HashKvRequest, MemberAddRequest, MemberPromoteRequest, MemberRemoveRequest, PutRequest, RangeRequest,
    StatusRequest, WatchCreateRequest, WatchRequest,
};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A member of the migrating cluster: which binary runs it, its node and process.
struct Member {
    keel: bool,
    node: Node,
    proc: Proc,
}

/// Where the members' data dirs go and which members serve clients now.
struct Ctx {
    base: PathBuf,
    live: Live,
}

/// The client URLs of the members serving now (the writer and the watcher pick from it).
type Live = Arc<Mutex<Vec<String>>>;

fn initial_cluster(nodes: &[&Node]) -> String {
    nodes.iter().map(|n| format!("{}={}", n.name, n.purl())).collect::<Vec<_>>().join(",")
}

/// Writes `w/<n>` = n, n = 0, 1, ..., on whichever member serves; the numbers acknowledged.
async fn writer(live: Live, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    let mut turn = 0usize;
    while !stop.load(Ordering::Acquire) {
        let url = {
            let l = live.lock();
            l[turn % l.len()].clone()
        };
        let mut kv = KvClient::new(channel(&url));
        let put = PutRequest { key: format!("w/{n:08}").into_bytes(), value: n.to_string().into_bytes(), ..Default::default() };
        match kv.put(put).await {
            Ok(_) => {
                acked.push(n);
                n += 1;
            }
            // Not acknowledged: it may or may not be there; the next write takes a new key.
            Err(_) => {
                n += 1;
                turn += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    acked
}

/// Watches `w/` from revision 1 on whichever member serves, moving to another when its member
/// goes, from the revision after the last seen. Every event as (key, mod revision), in order
/// received; fails on a `compacted` answer.
async fn watcher(live: Live, stop: Arc<AtomicBool>) -> Result<Vec<(String, i64)>, String> {
    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut next = 1i64;
    let mut turn = 0usize;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(seen);
        }
        let url = {
            let l = live.lock();
            l[turn % l.len()].clone()
        };
        turn += 1;
        let mut w = WatchClient::new(channel(&url));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let create = WatchCreateRequest { key: b"w/".to_vec(), range_end: b"w0".to_vec(), start_revision: next, ..Default::default() };
        let _ = tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await;
        let Ok(resp) = w.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut s = resp.into_inner();
        loop {
            let msg = tokio::select! {
                m = s.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stop.load(Ordering::Acquire) { return Ok(seen) }
                    continue;
                }
            };
            let Ok(Some(r)) = msg else { break };
            if r.compact_revision != 0 {
                return Err(format!("watch on {url} from {next}: compacted at {}", r.compact_revision));
            }
            if r.canceled {
                break;
            }
            for e in r.events {
                let kv = e.kv.unwrap_or_default();
                next = kv.mod_revision + 1;
                seen.push((String::from_utf8_lossy(&kv.key).into_owned(), kv.mod_revision));
            }
        }
        drop(tx);
    }
}

/// HashKV of every member at one revision, all equal (compared at the leader's revision after
/// every member applied it).
async fn hashes_agree(members: &[Member]) {
    let urls: Vec<String> = members.iter().map(|m| m.node.curl()).collect();
    let rev = retry("status", Duration::from_secs(20), || async {
        let s = MaintenanceClient::new(channel(&urls[0])).status(StatusRequest {}).await.map_err(|e| e.to_string())?.into_inner();
        Ok(s.header.unwrap_or_default().revision)
    })
    .await;
    let mut hashes = Vec::new();
    for (m, url) in members.iter().zip(&urls) {
        let h = retry(&format!("HashKV at {rev} on {url}"), Duration::from_secs(30), || async {
            let r = MaintenanceClient::new(channel(url))
                .hash_kv(HashKvRequest { revision: rev })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            Ok(r.hash)
        })
        .await;
        hashes.push((if m.keel { "keel" } else { "etcd" }, m.node.name.clone(), h));
    }
    assert!(hashes.windows(2).all(|w| w[0].2 == w[1].2), "HashKV at revision {rev} differs: {hashes:?}");
}

/// Replaces `old` (index in `members`) by a new member of the other kind named `name` on `ip`:
/// learner add, start, promotion, removal of `old`.
async fn replace(ctx: &Ctx, members: &mut Vec<Member>, old: usize, (name, ip): (&str, &str), bin: &Path, keel: bool) {
    let (base, live) = (&ctx.base, &ctx.live);
    let node = Node::new(name, ip);
    let ask = members.iter().enumerate().find(|(i, _)| *i != old).map(|(_, m)| m.node.curl()).unwrap();
    let added = retry(&format!("member add {name}"), Duration::from_secs(30), || async {
        let r = ClusterClient::new(channel(&ask))
            .member_add(MemberAddRequest { peer_ur_ls: vec![node.purl()], is_learner: true })
            .await
            .map_err(|e| e.to_string())?;
        Ok(r.into_inner().member.unwrap_or_default().id)
    })
    .await;
    let mut all: Vec<&Node> = members.iter().map(|m| &m.node).collect();
    all.push(&node);
    let dir = base.join(name);
    let mut args = node.args(&dir, &initial_cluster(&all));
    args.extend(["--initial-cluster-state".to_string(), "existing".to_string()]);
    let mut proc = spawn(bin, &dir, &node.curl(), &args);
    assert!(proc.wait_ready(), "{name} did not start:\n{}", proc.log_text());
    retry(&format!("promote {name}"), Duration::from_secs(60), || async {
        ClusterClient::new(channel(&ask)).member_promote(MemberPromoteRequest { id: added }).await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    live.lock().push(node.curl());
    members.push(Member { keel, node, proc });
    hashes_agree(members).await;

    let gone = members.remove(old);
    live.lock().retain(|u| *u != gone.node.curl());
    let ask = members[0].node.curl();
    let id = retry("member list", Duration::from_secs(20), || async {
        let l = ClusterClient::new(channel(&ask))
            .member_list(keel_proto::etcdserverpb::MemberListRequest::default())
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        l.members.iter().find(|m| m.name == gone.node.name).map(|m| m.id).ok_or_else(|| "not listed".to_string())
    })
    .await;
    retry(&format!("member remove {}", gone.node.name), Duration::from_secs(30), || async {
        ClusterClient::new(channel(&ask)).member_remove(MemberRemoveRequest { id }).await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    let mut gone = gone;
    // A removed member stops by itself (etcd and Keel both); a stop makes sure.
    gone.proc.stop();
    hashes_agree(members).await;
}

/// Replaces Keel member `i` by etcd (`bin`) in place, as etcd's downgrade replaces a binary:
/// taken out of the clients' set and stopped, its directory readied for etcd (`keel migrate
/// to-etcd`), etcd started on it as the same member.
async fn replace_in_place(ctx: &Ctx, members: &mut [Member], i: usize, bin: &Path) {
    let url = members[i].node.curl();
    ctx.live.lock().retain(|u| *u != url);
    assert_eq!(members[i].proc.stop(), Some(0), "{}", members[i].proc.log_text());
    let dir = ctx.base.join(&members[i].node.name);
    let out = std::process::Command::new(keel_bin()).args(["migrate", "to-etcd", "--data-dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ic = initial_cluster(&members.iter().map(|m| &m.node).collect::<Vec<_>>());
    let args = members[i].node.args(&dir, &ic);
    members[i].proc = spawn(bin, &dir, &url, &args);
    assert!(members[i].proc.wait_ready(), "etcd did not start in place of {}:\n{}", members[i].node.name, members[i].proc.log_text());
    members[i].keel = false;
    ctx.live.lock().push(url);
    hashes_agree(members).await;
}

/// The cluster version every member reports on `/version`.
fn cluster_versions(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(&http_get(&m.node.curl(), "/version")).unwrap_or_default();
            v["etcdcluster"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

/// etcd's downgrade to `target` ("3.6"): validated, enabled, and the cluster version lowered on
/// every member by the leader; a snapshot follows on every member (as etcd forces one), so
/// that the older release, started in place, replays no entry of the newer cluster version.
async fn downgrade_to(members: &[Member], target: &str) {
    use keel_proto::etcdserverpb::downgrade_request::DowngradeAction;
    let mut mt = MaintenanceClient::new(channel(&members[0].node.curl()));
    for action in [DowngradeAction::Validate, DowngradeAction::Enable] {
        let r = mt.downgrade(DowngradeRequest { action: action as i32, version: target.into() }).await.unwrap().into_inner();
        assert_eq!(r.version, "3.7", "{action:?} answers with the cluster version before the downgrade");
    }
    let again = mt.downgrade(DowngradeRequest { action: DowngradeAction::Enable as i32, version: target.into() }).await.unwrap_err();
    assert_eq!(again.message(), "etcdserver: cluster has a downgrade job in progress");
    let want = format!("{target}.0");
    retry(&format!("cluster version {want} on every member"), Duration::from_secs(30), || async {
        let got = cluster_versions(members);
        if got.iter().all(|v| *v == want) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    let s = mt.status(StatusRequest {}).await.unwrap().into_inner();
    let d = s.downgrade_info.unwrap_or_default();
    assert!(d.enabled && d.target_version == want, "{d:?}");
    assert_eq!(s.storage_version, want, "the storage version follows the cluster version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_migration_from_etcd_3_6_to_keel_and_back_under_load() {
    // KEEL_ROLLING_ETCD=v3.7.3 (or v3.5.36, ...) runs it against that release's build
    // (scripts/etcd-ref.sh VERSION); 3.6.16 by default.
    // KEEL_ROLLING_BACK_ETCD names the release rolled back out to (the same by default): once
    // only Keel is left the cluster version is Keel's (3.7), which an older etcd member refuses
    // to join ("incompatible with current running cluster"), as it refuses an etcd 3.7 cluster;
    // so a way out to 3.6 starts with etcd's downgrade (`downgrade_to`). etcd downgrades one
    // minor release at a time: out to 3.5 is not a way from 3.7 (nor from etcd 3.7).
    let version: &'static str = std::env::var("KEEL_ROLLING_ETCD").map(|v| &*v.leak()).unwrap_or("3.6");
    let back: &'static str = std::env::var("KEEL_ROLLING_BACK_ETCD").map(|v| &*v.leak()).unwrap_or(version);
    let Some(e) = etcd(version) else { return };
    let Some(out) = etcd(back) else { return };
    let keel = keel_bin();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let nodes: Vec<Node> = (1..=3).map(|i| Node::new(&format!("e{i}"), &format!("127.0.0.{i}"))).collect();
    let ic = initial_cluster(&nodes.iter().collect::<Vec<_>>());
    let mut procs: Vec<Proc> = nodes.iter().map(|n| n.spawn(&e.server, &base.join(&n.name), &ic)).collect();
    for (p, n) in procs.iter_mut().zip(&nodes) {
        assert!(p.wait_ready(), "etcd {} did not start:\n{}", n.name, p.log_text());
    }
    let mut members: Vec<Member> = nodes.into_iter().zip(procs).map(|(node, proc)| Member { keel: false, node, proc }).collect();
    let live: Live = Arc::new(Mutex::new(members.iter().map(|m| m.node.curl()).collect()));
    let ctx = Ctx { base: base.to_path_buf(), live: live.clone() };

    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(live.clone(), stop.clone()));
    let watch = tokio::spawn(watcher(live.clone(), stop.clone()));

    // In: each etcd member replaced by a Keel member, on the same addresses' neighbours.
    for (i, ip) in ["127.0.0.4", "127.0.0.5", "127.0.0.6"].iter().enumerate() {
        replace(&ctx, &mut members, 0, (&format!("k{}", i + 1), ip), &keel, true).await;
    }
    assert!(members.iter().all(|m| m.keel), "only Keel members are left");
    // Out to an older minor release (etcd 3.6) takes etcd's downgrade first: the cluster version
    // (3.7 once only Keel is left, as with etcd 3.7 members) is lowered to the target, which
    // etcd 3.6 members can join.
    let back_minor = if back == "3.6" { "3.6" } else { back.trim_start_matches('v').rsplit_once('.').map_or(back, |(mm, _)| mm) };
    if back_minor != "3.7" {
        downgrade_to(&members, back_minor).await;
        // etcd 3.6 joins a downgrading cluster only as a member it already was (a new one
        // expects a 3.7 cluster version while a downgrade is on): each Keel member becomes
        // etcd 3.6 in place, as etcd's downgrade swaps binaries.
        for i in 0..members.len() {
            replace_in_place(&ctx, &mut members, i, &out.server).await;
        }
        // Every member runs the target: etcd's leader ends the downgrade.
        retry("the downgrade ends", Duration::from_secs(60), || async {
            match http_get(&members[0].node.purl(), "/downgrade/enabled").trim() {
                "false" => Ok(()),
                other => Err(other.to_string()),
            }
        })
        .await;
    } else {
        // Out: back to etcd the same way.
        for (i, ip) in ["127.0.0.7", "127.0.0.8", "127.0.0.9"].iter().enumerate() {
            replace(&ctx, &mut members, 0, (&format!("f{}", i + 1), ip), &out.server, false).await;
        }
    }
    assert!(members.iter().all(|m| !m.keel), "only etcd members are left");

    stop.store(true, Ordering::Release);
    let acked = w.await.unwrap();
    let seen = watch.await.unwrap().expect("the watch never saw a compaction");
    assert!(acked.len() > 100, "the writer wrote throughout: {} writes", acked.len());

    // Every acknowledged write is there.
    let mut kv = KvClient::new(channel(&members[0].node.curl()));
    let r = kv.range(RangeRequest { key: b"w/".to_vec(), range_end: b"w0".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    let stored: std::collections::BTreeMap<String, i64> =
        r.kvs.iter().map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.mod_revision)).collect();
    for n in &acked {
        assert!(stored.contains_key(&format!("w/{n:08}")), "acknowledged write w/{n:08} is lost");
    }
    // The watch saw every write exactly once, in revision order (the last writes may be after
    // it stopped).
    assert!(seen.windows(2).all(|p| p[0].1 < p[1].1), "watch events out of order or repeated");
    let last = seen.last().map(|s| s.1).unwrap_or(0);
    let watched: std::collections::BTreeMap<String, i64> = seen.into_iter().collect();
    for (k, rev) in stored.iter().filter(|(_, r)| **r <= last) {
        assert_eq!(watched.get(k), Some(rev), "the watch missed {k} at revision {rev}");
    }
    for m in &mut members {
        m.proc.stop();
    }
}

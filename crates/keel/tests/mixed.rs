//! One cluster of etcd 3.6.16 and Keel members, over etcd's peer protocol: what each kind serves
//! as a follower of a leader of the other kind, and how a member of one kind that fell behind
//! catches up from a leader of the other kind by a snapshot (the raft snapshot message and the
//! backend in bbolt form).
//!
//! Needs etcd 3.6.16 (`scripts/etcd-ref.sh`); skipped only when `KEEL_SKIP_ETCD_ORACLE=1`.

mod common;

use common::*;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::{
    watch_request, HashKvRequest, MoveLeaderRequest, PutRequest, RangeRequest, StatusRequest, WatchCreateRequest, WatchRequest,
};
use std::path::Path;
use std::time::Duration;

/// A member: which kind runs it, its node, data dir and process.
struct Member {
    keel: bool,
    node: Node,
    dir: std::path::PathBuf,
    proc: Proc,
}

impl Member {
    fn kind(&self) -> &'static str {
        if self.keel {
            "keel"
        } else {
            "etcd"
        }
    }
}

/// Starts one cluster whose members run etcd (`false`) or Keel (`true`) as `kinds` says, each
/// with `extra` flags, on 127.0.0.11 and up.
fn start_cluster(base: &Path, etcd_bin: &Path, kinds: &[bool], extra: &[&str]) -> Vec<Member> {
    let nodes: Vec<Node> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| Node::new(&format!("{}{i}", if *k { "k" } else { "e" }), &format!("127.0.0.{}", 11 + i)))
        .collect();
    let ic = nodes.iter().map(|n| format!("{}={}", n.name, n.purl())).collect::<Vec<_>>().join(",");
    let mut members = Vec::new();
    for (node, keel) in nodes.into_iter().zip(kinds) {
        let dir = base.join(&node.name);
        let bin = if *keel { keel_bin() } else { etcd_bin.to_path_buf() };
        let mut args = node.args(&dir, &ic);
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = spawn(&bin, &dir, &node.curl(), &args);
        members.push(Member { keel: *keel, node, dir, proc });
    }
    for m in &mut members {
        assert!(m.proc.wait_ready(), "{} {} did not start:\n{}", m.kind(), m.node.name, m.proc.log_text());
    }
    members
}

/// (member ID, leader ID) as `url`'s member reports them.
async fn status(url: &str) -> Result<(u64, u64), String> {
    let s = MaintenanceClient::new(channel(url)).status(StatusRequest {}).await.map_err(|e| e.to_string())?.into_inner();
    Ok((s.header.unwrap_or_default().member_id, s.leader))
}

/// Makes `members[to]` the leader (MoveLeader, sent to the current leader) and waits until every
/// member sees it lead.
async fn lead(members: &[Member], to: usize) {
    let (target, _) = retry("status", Duration::from_secs(20), || status_of(&members[to])).await;
    retry(&format!("move the leader to {}", members[to].node.name), Duration::from_secs(60), || async {
        let mut ids = Vec::new();
        for m in members {
            ids.push(status_of(m).await?);
        }
        if ids.iter().all(|(_, l)| *l == target) {
            return Ok(());
        }
        let leader = ids.iter().find(|(id, l)| id == l).ok_or("no leader yet")?;
        let at = members.iter().zip(&ids).find(|(_, (id, _))| *id == leader.0).map(|(m, _)| m.node.curl()).ok_or("leader unknown")?;
        MaintenanceClient::new(channel(&at)).move_leader(MoveLeaderRequest { target_id: target }).await.map_err(|e| e.to_string())?;
        Err("moved; checking".into())
    })
    .await;
}

async fn status_of(m: &Member) -> Result<(u64, u64), String> {
    status(&m.node.curl()).await
}

/// HashKV of `members` at the revision of `members[0]`, once all agree.
async fn hashes_agree(members: &[&Member]) {
    let url0 = members[0].node.curl();
    let rev = retry("status", Duration::from_secs(20), || async {
        let s = MaintenanceClient::new(channel(&url0)).status(StatusRequest {}).await.map_err(|e| e.to_string())?.into_inner();
        Ok(s.header.unwrap_or_default().revision)
    })
    .await;
    retry(&format!("equal HashKV at revision {rev}"), Duration::from_secs(60), || async {
        let mut hashes = Vec::new();
        for m in members {
            let r = MaintenanceClient::new(channel(&m.node.curl()))
                .hash_kv(HashKvRequest { revision: rev })
                .await
                .map_err(|e| format!("{} {}: {e}", m.kind(), m.node.name))?
                .into_inner();
            hashes.push((m.kind(), m.node.name.clone(), r.hash));
        }
        if hashes.windows(2).all(|w| w[0].2 == w[1].2) {
            Ok(())
        } else {
            Err(format!("{hashes:?}"))
        }
    })
    .await;
}

/// A counter of `name` on `url`'s `/metrics`, summed over its labels.
fn metric_sum(url: &str, name: &str) -> f64 {
    let text = http_get(url, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Through a follower `f` of a leader `l` of the other kind: each write acknowledged by `l` is
/// seen at once by a linearizable read on `f`, and a watch on `f` delivers every write once, in
/// order, at the revision `l` acknowledged.
async fn reads_and_watch_through(l: &Member, f: &Member, prefix: &str) {
    let (fid, fleader) = retry("status", Duration::from_secs(20), || status_of(f)).await;
    let (lid, _) = retry("status", Duration::from_secs(20), || status_of(l)).await;
    assert!(fleader == lid && fid != lid, "{} {} must follow {} {}", f.kind(), f.node.name, l.kind(), l.node.name);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let create = WatchCreateRequest { key: prefix.as_bytes().to_vec(), range_end: format!("{prefix}~").into_bytes(), ..Default::default() };
    tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await.unwrap();
    let mut watch =
        WatchClient::new(channel(&f.node.curl())).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let created = watch.message().await.unwrap().expect("watch created");
    assert!(created.created, "{created:?}");
    let (mut lkv, mut fkv) = (KvClient::new(channel(&l.node.curl())), KvClient::new(channel(&f.node.curl())));
    let mut acked = Vec::new();
    for i in 0..40 {
        let key = format!("{prefix}{i:03}");
        let r = lkv
            .put(PutRequest { key: key.clone().into(), value: format!("v{i}").into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let rev = r.header.unwrap_or_default().revision;
        let got = fkv.range(RangeRequest { key: key.clone().into(), ..Default::default() }).await.unwrap().into_inner();
        let kv = got.kvs.first().unwrap_or_else(|| panic!("{} follower {} missed {key} acknowledged at {rev}", f.kind(), f.node.name));
        assert_eq!((kv.mod_revision, kv.value.as_slice()), (rev, format!("v{i}").as_bytes()), "{key}");
        assert!(got.header.unwrap_or_default().revision >= rev);
        acked.push((key, rev));
    }
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        let m = tokio::time::timeout(Duration::from_secs(20), watch.message()).await.expect("watch events").unwrap().expect("watch open");
        assert!(!m.canceled && m.compact_revision == 0, "{m:?}");
        seen.extend(m.events.iter().map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            (String::from_utf8_lossy(&kv.key).into_owned(), kv.mod_revision)
        }));
    }
    drop(tx);
    assert_eq!(seen, acked, "the watch on {} {} saw every write once, in order", f.kind(), f.node.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_reads_and_watches_via_followers_of_the_other_kind() {
    let Some(e) = etcd("3.6") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut members = start_cluster(tmp.path(), &e.server, &[false, true, true], &[]);
    // An etcd leader: both Keel members follow it.
    lead(&members, 0).await;
    reads_and_watch_through(&members[0], &members[1], "a/").await;
    reads_and_watch_through(&members[0], &members[2], "b/").await;
    // A Keel leader: the etcd member follows it.
    lead(&members, 1).await;
    reads_and_watch_through(&members[1], &members[0], "c/").await;
    hashes_agree(&members.iter().collect::<Vec<_>>()).await;
    for m in &mut members {
        m.proc.stop();
    }
}

/// Stops `members[lag]`, writes until the leader `members[leader]` has compacted its log past
/// it, restarts it, and checks it caught up by a snapshot from the leader.
async fn catch_up_by_snapshot(members: &mut [Member], leader: usize, lag: usize, etcd_bin: &Path, ic: &str, prefix: &str) {
    lead(members, leader).await;
    let url = members[leader].node.curl();
    let sent_before = metric_sum(&url, "etcd_network_snapshot_send_success");
    // etcd re-raises SIGTERM after its shutdown, so only Keel's exit status is 0.
    let code = members[lag].proc.stop();
    assert!(!members[lag].keel || code == Some(0), "{:?}\n{}", code, members[lag].proc.log_text());
    let mut kv = KvClient::new(channel(&url));
    // --snapshot-count 20, --snapshot-catchup-entries 10: 300 entries leave the stopped member's
    // index far before the leader's first log entry.
    let stopped_at = MaintenanceClient::new(channel(&url)).status(StatusRequest {}).await.unwrap().into_inner().raft_index;
    for i in 0..300 {
        kv.put(PutRequest { key: format!("{prefix}{i:04}").into(), value: vec![b'x'; 100], ..Default::default() }).await.unwrap();
    }
    if members[leader].keel {
        // etcd's leader compacts at its snapshots regardless of followers.
        wait_raft_log_past(&url, stopped_at).await;
    }
    let m = &mut members[lag];
    let bin = if m.keel { keel_bin() } else { etcd_bin.to_path_buf() };
    let mut args = m.node.args(&m.dir, ic);
    args.extend(["--snapshot-count", "20", "--snapshot-catchup-entries", "10"].iter().map(|s| s.to_string()));
    m.proc = spawn(&bin, &m.dir, &m.node.curl(), &args);
    assert!(m.proc.wait_ready(), "{} {} did not restart:\n{}", m.kind(), m.node.name, m.proc.log_text());
    hashes_agree(&[&members[leader], &members[lag]]).await;
    let lag_url = members[lag].node.curl();
    let got = KvClient::new(channel(&lag_url))
        .range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: format!("{prefix}~").into_bytes(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.count, 300);
    let received = metric_sum(&lag_url, "etcd_network_snapshot_receive_success");
    let sent = metric_sum(&url, "etcd_network_snapshot_send_success");
    assert!(
        received >= 1.0 && sent > sent_before,
        "{} {} caught up from {} {} without a snapshot (received {received}, sent {sent_before} -> {sent})",
        members[lag].kind(),
        members[lag].node.name,
        members[leader].kind(),
        members[leader].node.name
    );
    if members[leader].keel {
        // An etcd member was sent etcd's backend file, never Keel's records.
        let (as_etcd, as_keel) = (snapshots_sent_as(&url, "etcd"), snapshots_sent_as(&url, "keel"));
        assert!(as_etcd >= 1.0 && as_keel == 0.0, "Keel leader to an etcd member: {as_etcd} etcd backend files, {as_keel} Keel records");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_member_catches_up_by_snapshot_from_a_leader_of_the_other_kind() {
    let Some(e) = etcd("3.6") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["--snapshot-count", "20", "--snapshot-catchup-entries", "10"];
    let mut members = start_cluster(tmp.path(), &e.server, &[false, true, false], &extra);
    let ic = members.iter().map(|m| format!("{}={}", m.node.name, m.node.purl())).collect::<Vec<_>>().join(",");
    // A Keel member behind an etcd leader, then an etcd member behind a Keel leader.
    catch_up_by_snapshot(&mut members, 0, 1, &e.server, &ic, "s1/").await;
    catch_up_by_snapshot(&mut members, 1, 0, &e.server, &ic, "s2/").await;
    hashes_agree(&members.iter().collect::<Vec<_>>()).await;
    for m in &mut members {
        m.proc.stop();
    }
}

/// Writes `n` keys under `prefix` through `url`.
async fn put_keys(url: &str, prefix: &str, n: usize) {
    let mut kv = KvClient::new(channel(url));
    for i in 0..n {
        kv.put(PutRequest { key: format!("{prefix}{i:04}").into(), value: vec![b'v'; 64], ..Default::default() }).await.unwrap();
    }
}

/// How many keys under `prefix` `url`'s member holds (a serializable read: its own copy).
async fn count_on(url: &str, prefix: &str) -> i64 {
    KvClient::new(channel(url))
        .range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: format!("{prefix}~").into_bytes(),
            count_only: true,
            serializable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_starts_in_place_on_a_keel_members_directory_and_keel_on_it_again() {
    let Some(e) = etcd("3.6") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Snapshots every 20 entries: the member's directory has snapshot files and a WAL that no
    // longer starts at 1, which etcd must read as they are.
    let extra = ["--snapshot-count", "20", "--snapshot-catchup-entries", "10"];
    let mut members = start_cluster(tmp.path(), &e.server, &[false, true, true], &extra);
    let ic = members.iter().map(|m| format!("{}={}", m.node.name, m.node.purl())).collect::<Vec<_>>().join(",");
    let url0 = members[0].node.curl();
    put_keys(&url0, "a/", 100).await;
    hashes_agree(&members.iter().collect::<Vec<_>>()).await;

    // Keel member k2 stops; its directory is readied for etcd, which starts on it as k2.
    assert_eq!(members[2].proc.stop(), Some(0), "{}", members[2].proc.log_text());
    let dir = members[2].dir.clone();
    let out = std::process::Command::new(keel_bin()).args(["migrate", "to-etcd", "--data-dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let m = &mut members[2];
    let mut args = m.node.args(&m.dir, &ic);
    args.extend(extra.iter().map(|s| s.to_string()));
    m.proc = spawn(&e.server, &m.dir, &m.node.curl(), &args);
    m.keel = false;
    assert!(m.proc.wait_ready(), "etcd did not start on Keel's directory:\n{}", m.proc.log_text());
    // etcd read Keel's newest snapshot file (not "No snapshot found").
    assert!(m.proc.log_text().contains("recovered v2 store from snapshot"), "{}", m.proc.log_text());
    let url2 = members[2].node.curl();
    assert_eq!(count_on(&url2, "a/").await, 100, "etcd serves what the Keel member had");
    put_keys(&members[1].node.curl(), "b/", 100).await;
    hashes_agree(&members.iter().collect::<Vec<_>>()).await;
    assert_eq!(count_on(&url2, "b/").await, 100);

    // And back: Keel starts on the directory etcd ran on (converting it at start).
    members[2].proc.stop();
    let m = &mut members[2];
    m.proc = spawn(&keel_bin(), &m.dir, &m.node.curl(), &args);
    m.keel = true;
    assert!(m.proc.wait_ready(), "Keel did not start on the directory again:\n{}", m.proc.log_text());
    put_keys(&url0, "c/", 50).await;
    hashes_agree(&members.iter().collect::<Vec<_>>()).await;
    assert_eq!((count_on(&url2, "a/").await, count_on(&url2, "b/").await, count_on(&url2, "c/").await), (100, 100, 50));
    for m in &mut members {
        m.proc.stop();
    }
}

/// The cluster version `m` reports on `/version`.
fn cluster_version_of(m: &Member) -> String {
    let v: serde_json::Value = serde_json::from_str(&http_get(&m.node.curl(), "/version")).unwrap_or_default();
    v["etcdcluster"].as_str().unwrap_or_default().to_string()
}

async fn cluster_version_is(members: &[Member], want: &str) {
    retry(&format!("cluster version {want} on every member"), Duration::from_secs(30), || async {
        let got: Vec<String> = members.iter().map(cluster_version_of).collect();
        if got.iter().all(|v| v == want) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_downgrade_lowers_the_cluster_version_until_it_is_cancelled() {
    use keel_proto::etcdserverpb::downgrade_request::DowngradeAction;
    use keel_proto::etcdserverpb::DowngradeRequest;
    let tmp = tempfile::tempdir().unwrap();
    let mut members = start_cluster(tmp.path(), Path::new("unused"), &[true, true, true], &[]);
    cluster_version_is(&members, "3.7.0").await;
    let mut mt = MaintenanceClient::new(channel(&members[1].node.curl()));
    let ask = |action: DowngradeAction, version: &str| DowngradeRequest { action: action as i32, version: version.into() };
    // etcd 3.7's answers (one minor release down only).
    let e = mt.downgrade(ask(DowngradeAction::Validate, "3.5")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "etcdserver: invalid downgrade target version"));
    let e = mt.downgrade(ask(DowngradeAction::Enable, "three")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "etcdserver: wrong downgrade target version format"));
    assert_eq!(mt.downgrade(ask(DowngradeAction::Cancel, "")).await.unwrap().into_inner().version, "3.7", "nothing to cancel: answered");
    assert_eq!(mt.downgrade(ask(DowngradeAction::Validate, "3.6")).await.unwrap().into_inner().version, "3.7");
    cluster_version_is(&members, "3.7.0").await;
    assert_eq!(mt.downgrade(ask(DowngradeAction::Enable, "3.6.1")).await.unwrap().into_inner().version, "3.7");
    let e = mt.downgrade(ask(DowngradeAction::Enable, "3.6")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::FailedPrecondition, "etcdserver: cluster has a downgrade job in progress"));
    // The leader lowers the cluster version to the target and holds it there.
    cluster_version_is(&members, "3.6.0").await;
    for m in &members {
        assert_eq!(http_get(&m.node.purl(), "/downgrade/enabled").trim(), "true");
        let d =
            MaintenanceClient::new(channel(&m.node.curl())).status(StatusRequest {}).await.unwrap().into_inner().downgrade_info.unwrap();
        assert!(d.enabled && d.target_version == "3.6.0", "{d:?}");
        // As etcd: the lowered cluster version forces a snapshot (the count, 10,000, is far),
        // so that etcd 3.6 started in place replays no entry of the 3.7 cluster version.
        let snap = m.dir.join("member/snap");
        retry(&format!("a snapshot file in {}", snap.display()), Duration::from_secs(30), || async {
            let n = std::fs::read_dir(&snap)
                .map_err(|e| e.to_string())?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
                .count();
            if n > 0 {
                Ok(())
            } else {
                Err("none".to_string())
            }
        })
        .await;
    }
    // Cancelled: every member runs 3.7, so the version rises again.
    assert_eq!(mt.downgrade(ask(DowngradeAction::Cancel, "")).await.unwrap().into_inner().version, "3.6");
    cluster_version_is(&members, "3.7.0").await;
    for m in &members {
        assert_eq!(http_get(&m.node.purl(), "/downgrade/enabled").trim(), "false");
    }
    for m in &mut members {
        m.proc.stop();
    }
}

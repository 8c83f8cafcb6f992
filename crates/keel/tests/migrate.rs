//! Migration both ways, against real etcd (3.4.23 from Debian, 3.6.16 from `scripts/etcd-ref.sh`):
//! a history written to etcd, its snapshot restored into a 3-member Keel cluster, reads the same
//! at every uncompacted revision (compaction point, current revision, leases, users and roles
//! too) and takes writes at the next revision; Keel's own snapshot, restored by etcdctl 3.4 and
//! by etcdutl 3.6, starts real etcd with the same data at the same revision; and a stopped etcd
//! member's data dir starts as a Keel member.

mod common;

use common::*;
use keel_proto::etcdserverpb::auth_client::AuthClient;
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::transport::Channel;

async fn channel(ep: &str) -> Channel {
    Channel::from_shared(ep.to_string()).unwrap().connect().await.unwrap_or_else(|e| panic!("connect {ep}: {e}"))
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest { key: k.into(), value: v.into(), ..Default::default() }
}

/// The history: puts and updates, deletes, a range delete, txns both ways, a lease with keys,
/// users and roles, a compaction, and writes after it. Returns the current revision.
async fn write_history(ep: &str) -> i64 {
    let ch = channel(ep).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut auth = AuthClient::new(ch);
    for i in 0..24 {
        kv.put(put(&format!("k{}", i % 7), &format!("v{i}"))).await.unwrap();
    }
    kv.delete_range(DeleteRangeRequest { key: "k3".into(), ..Default::default() }).await.unwrap();
    for (want, then) in [("v22", "k8"), ("nope", "k9")] {
        let cmp = Compare {
            key: "k1".into(),
            target: CompareTarget::Value as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Value(want.into())),
            ..Default::default()
        };
        let op = |k: &str| RequestOp { request: Some(request_op::Request::RequestPut(put(k, "txn"))) };
        kv.txn(TxnRequest { compare: vec![cmp], success: vec![op(then)], failure: vec![op("k10")] }).await.unwrap();
    }
    kv.delete_range(DeleteRangeRequest { key: "k5".into(), range_end: "k7".into(), ..Default::default() }).await.unwrap();
    let l = lease.lease_grant(LeaseGrantRequest { ttl: 900, id: 0 }).await.unwrap().into_inner();
    for k in ["leased1", "leased2"] {
        kv.put(PutRequest { lease: l.id, ..put(k, "l") }).await.unwrap();
    }
    lease.lease_grant(LeaseGrantRequest { ttl: 1200, id: 0x1234 }).await.unwrap();
    auth.user_add(AuthUserAddRequest { name: "alice".into(), password: "pw".into(), ..Default::default() }).await.unwrap();
    auth.role_add(AuthRoleAddRequest { name: "reader".into() }).await.unwrap();
    let perm = keel_proto::authpb::Permission { perm_type: 0, key: "k".into(), range_end: "l".into() };
    auth.role_grant_permission(AuthRoleGrantPermissionRequest { name: "reader".into(), perm: Some(perm) }).await.unwrap();
    auth.user_grant_role(AuthUserGrantRoleRequest { user: "alice".into(), role: "reader".into() }).await.unwrap();
    let cur = kv.range(RangeRequest { key: "k0".into(), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    kv.compact(CompactionRequest { revision: cur - 12, physical: true }).await.unwrap();
    kv.put(put("k1", "after")).await.unwrap();
    kv.put(put("k11", "after")).await.unwrap();
    kv.range(RangeRequest { key: "k0".into(), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision
}

/// A key as a Range returns it: key, value, create and mod revision, version, lease.
type Kv = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);
/// A permission: type, key, range end.
type Perm = (i32, Vec<u8>, Vec<u8>);

/// Everything a client can see of the data.
#[derive(Debug, PartialEq)]
struct State {
    current: i64,
    compacted: i64,
    below_compaction_refused: bool,
    /// Every key at every revision from the compaction point on.
    revisions: Vec<(i64, Vec<Kv>)>,
    /// Lease ID, granted TTL, keys.
    leases: Vec<(i64, i64, Vec<Vec<u8>>)>,
    users: Vec<(String, Vec<String>)>,
    roles: Vec<(String, Vec<Perm>)>,
}

/// The history left something of every kind to compare (so that equal states mean something).
fn assert_rich(s: &State, what: &str) {
    assert!(s.compacted > 1 && s.below_compaction_refused, "{what}: no compaction: {s:?}");
    assert!(s.revisions.len() >= 12, "{what}: {} revisions", s.revisions.len());
    assert!(s.revisions.iter().any(|(_, kvs)| kvs.iter().any(|k| k.5 != 0)), "{what}: no leased key");
    assert_eq!(s.leases.len(), 2, "{what}");
    assert_eq!(s.users, vec![("alice".to_string(), vec!["reader".to_string()])], "{what}");
    assert_eq!(s.roles.len(), 1, "{what}");
}

async fn read_state(ep: &str) -> State {
    let ch = channel(ep).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut auth = AuthClient::new(ch.clone());
    let mut m = MaintenanceClient::new(ch);
    let all = |revision| RangeRequest { key: vec![0], range_end: vec![0], revision, serializable: false, ..Default::default() };
    let current = kv.range(all(0)).await.unwrap().into_inner().header.unwrap().revision;
    let compacted = m.hash_kv(HashKvRequest { revision: 0 }).await.unwrap().into_inner().compact_revision;
    let below_compaction_refused =
        compacted > 1 && kv.range(all(compacted - 1)).await.err().map(|e| e.code()) == Some(tonic::Code::OutOfRange);
    let mut revisions = Vec::new();
    for rev in compacted.max(1)..=current {
        let kvs = kv.range(all(rev)).await.unwrap().into_inner().kvs;
        revisions.push((rev, kvs.into_iter().map(|k| (k.key, k.value, k.create_revision, k.mod_revision, k.version, k.lease)).collect()));
    }
    let mut leases = Vec::new();
    let mut ids: Vec<i64> =
        lease.lease_leases(LeaseLeasesRequest {}).await.unwrap().into_inner().leases.into_iter().map(|l| l.id).collect();
    ids.sort();
    for id in ids {
        let t = lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }).await.unwrap().into_inner();
        let mut keys = t.keys;
        keys.sort();
        leases.push((id, t.granted_ttl, keys));
    }
    let mut users = Vec::new();
    for u in auth.user_list(AuthUserListRequest {}).await.unwrap().into_inner().users {
        let mut roles = auth.user_get(AuthUserGetRequest { name: u.clone() }).await.unwrap().into_inner().roles;
        roles.sort();
        users.push((u, roles));
    }
    let mut roles = Vec::new();
    for r in auth.role_list(AuthRoleListRequest {}).await.unwrap().into_inner().roles {
        let perms = auth.role_get(AuthRoleGetRequest { role: r.clone() }).await.unwrap().into_inner().perm;
        roles.push((r, perms.into_iter().map(|p| (p.perm_type, p.key, p.range_end)).collect()));
    }
    State { current, compacted, below_compaction_refused, revisions, leases, users, roles }
}

/// The snapshot stream of the member at `ep`, as `etcdctl snapshot save` writes it (the
/// database, then its sha256).
async fn save_snapshot(ep: &str, to: &Path) {
    let mut m = MaintenanceClient::new(channel(ep).await);
    let mut s = m.snapshot(SnapshotRequest {}).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(msg) = s.message().await.unwrap() {
        bytes.extend_from_slice(&msg.blob);
    }
    std::fs::write(to, bytes).unwrap();
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run tool");
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

async fn etcd_snapshot_restored_into_three_keel_members(e: Etcd) {
    let tmp = tempfile::tempdir().unwrap();
    let src = Node::new("src", "127.0.0.1");
    let mut etcd_proc = src.start(&e.server, &tmp.path().join("etcd.etcd"), &format!("src={}", src.purl()));
    write_history(&src.curl()).await;
    let want = read_state(&src.curl()).await;
    assert_rich(&want, e.version);
    let file = tmp.path().join("etcd.snapshot");
    save_snapshot(&src.curl(), &file).await;
    etcd_proc.stop();

    let nodes: Vec<Node> = (1..=3).map(|i| Node::new(&format!("m{i}"), &format!("127.0.0.{i}"))).collect();
    let ic = nodes.iter().map(|n| format!("{}={}", n.name, n.purl())).collect::<Vec<_>>().join(",");
    let mut procs = Vec::new();
    for n in &nodes {
        let dir = tmp.path().join(format!("{}.etcd", n.name));
        run(Command::new(keel_bin()).args(["snapshot", "restore"]).arg(&file).args(n.restore_args(&dir, &ic)));
        procs.push(n.spawn(&keel_bin(), &dir, &ic));
    }
    for p in procs.iter_mut() {
        assert!(p.wait_ready(), "{}", p.log_text());
    }
    for n in &nodes {
        assert_eq!(read_state(&n.curl()).await, want, "etcd {} snapshot restored into Keel member {}", e.version, n.name);
    }
    let r = KvClient::new(channel(&nodes[1].curl()).await).put(put("next", "1")).await.unwrap().into_inner();
    assert_eq!(r.header.unwrap().revision, want.current + 1, "writes continue at the next revision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_3_4_snapshot_restored_into_keel_reads_identically() {
    if let Some(e) = etcd("3.4") {
        etcd_snapshot_restored_into_three_keel_members(e).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_3_6_snapshot_restored_into_keel_reads_identically() {
    if let Some(e) = etcd("3.6") {
        etcd_snapshot_restored_into_three_keel_members(e).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_snapshot_restored_by_etcd_tools_starts_etcd_with_the_same_data() {
    let tmp = tempfile::tempdir().unwrap();
    let k = Node::new("k", "127.0.0.1");
    let mut keel = k.start(&keel_bin(), &tmp.path().join("keel.etcd"), &format!("k={}", k.purl()));
    write_history(&k.curl()).await;
    let want = read_state(&k.curl()).await;
    assert_rich(&want, "keel");
    let file = tmp.path().join("keel.snapshot");
    save_snapshot(&k.curl(), &file).await;
    keel.stop();
    // etcd 3.6 refuses the 3.7 schema of a Keel (3.7) snapshot, as it refuses etcd 3.7.3's own:
    // out of a 3.7 cluster into etcd 3.6 goes through a downgrade first (tests/rolling.rs).
    for v in ["3.4", "v3.7.3", "3.6"] {
        let Some(e) = etcd(v) else { continue };
        let n = Node::new("restored", "127.0.0.2");
        let dir = tmp.path().join(format!("etcd-{v}.etcd"));
        let (tool, extra): (&Path, &[&str]) = match &e.utl {
            Some(utl) => (utl, &[]),
            None => (&e.ctl, &[]),
        };
        let ic = format!("restored={}", n.purl());
        run(Command::new(tool)
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(&file)
            .args(extra)
            .args(n.restore_args(&dir, &ic)));
        if v == "3.6" {
            let mut p = n.spawn(&e.server, &dir, &ic);
            assert_eq!(p.wait_ready_for(std::time::Duration::from_secs(30)), Some(false), "etcd 3.6 started on a 3.7 schema");
            assert!(p.log_text().contains(r#"version \"3.7.0\" is not supported"#), "{}", p.log_text());
            continue;
        }
        let mut p = n.start(&e.server, &dir, &ic);
        assert_eq!(read_state(&n.curl()).await, want, "Keel's snapshot restored by etcd {v}'s tool");
        let r = KvClient::new(channel(&n.curl()).await).put(put("next", "1")).await.unwrap().into_inner();
        assert_eq!(r.header.unwrap().revision, want.current + 1, "etcd {v} continues at the next revision");
        p.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_etcd_member_starts_as_keel() {
    for v in ["3.4", "3.6"] {
        let Some(e) = etcd(v) else { continue };
        let tmp = tempfile::tempdir().unwrap();
        let n = Node::new("m", "127.0.0.1");
        let dir = tmp.path().join("m.etcd");
        let ic = format!("m={}", n.purl());
        let mut etcd_proc = n.start(&e.server, &dir, &ic);
        write_history(&n.curl()).await;
        let want = read_state(&n.curl()).await;
        assert_rich(&want, v);
        etcd_proc.stop();
        let mut keel = n.start(&keel_bin(), &dir, &ic);
        assert_eq!(read_state(&n.curl()).await, want, "etcd {v}'s data dir under Keel");
        assert!(dir.join("member.etcd/snap/db").exists(), "the etcd files are kept");
        let r = KvClient::new(channel(&n.curl()).await).put(put("next", "1")).await.unwrap().into_inner();
        assert_eq!(r.header.unwrap().revision, want.current + 1);
        // And again after a restart: the converted member is an ordinary Keel member.
        keel.stop();
        let _keel = n.start(&keel_bin(), &dir, &ic);
        assert_eq!(read_state(&n.curl()).await.current, want.current + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_three_member_etcd_cluster_starts_as_keel() {
    for v in ["3.4", "3.6"] {
        let Some(e) = etcd(v) else { continue };
        let tmp = tempfile::tempdir().unwrap();
        let nodes: Vec<Node> = (1..=3).map(|i| Node::new(&format!("m{i}"), &format!("127.0.0.{i}"))).collect();
        let ic = nodes.iter().map(|n| format!("{}={}", n.name, n.purl())).collect::<Vec<_>>().join(",");
        let dirs: Vec<PathBuf> = nodes.iter().map(|n| tmp.path().join(format!("{}.etcd", n.name))).collect();
        let start_all = |bin: PathBuf| -> Vec<Proc> { nodes.iter().zip(&dirs).map(|(n, d)| n.spawn(&bin, d, &ic)).collect() };
        let mut etcds = start_all(e.server.clone());
        for p in etcds.iter_mut() {
            assert!(p.wait_ready(), "{}", p.log_text());
        }
        write_history(&nodes[0].curl()).await;
        let want = read_state(&nodes[2].curl()).await;
        assert_rich(&want, v);
        for p in etcds.iter_mut() {
            p.stop();
        }
        let mut keels = start_all(keel_bin());
        for p in keels.iter_mut() {
            assert!(p.wait_ready(), "{}", p.log_text());
        }
        for n in &nodes {
            assert_eq!(read_state(&n.curl()).await, want, "etcd {v} member {} under Keel", n.name);
        }
        let r = KvClient::new(channel(&nodes[2].curl()).await).put(put("next", "1")).await.unwrap().into_inner();
        assert_eq!(r.header.unwrap().revision, want.current + 1);
        let members = keel_proto::etcdserverpb::cluster_client::ClusterClient::new(channel(&nodes[0].curl()).await)
            .member_list(MemberListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .members;
        let mut names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["m1", "m2", "m3"], "etcd {v}: {members:?}");
    }
}

/// `keel snapshot status` prints what etcdutl 3.7.3 prints (live keys, the storage version, the
/// database's size), for a snapshot taken from etcd and one taken from Keel, in each format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_status_prints_what_etcdutl_prints() {
    let Some(e) = etcd("v3.7.3") else { return };
    let utl = e.utl.clone().expect("etcdutl 3.7");
    let tmp = tempfile::tempdir().unwrap();
    for (name, bin) in [("etcd", e.server.clone()), ("keel", keel_bin())] {
        let n = Node::new(name, "127.0.0.1");
        let mut p = n.start(&bin, &tmp.path().join(format!("{name}.etcd")), &format!("{name}={}", n.purl()));
        write_history(&n.curl()).await;
        let file = tmp.path().join(format!("{name}.snapshot"));
        save_snapshot(&n.curl(), &file).await;
        p.stop();
        for w in ["simple", "table", "json", "fields"] {
            let out = |bin: &std::path::Path| {
                let o = Command::new(bin).args(["snapshot", "status"]).arg(&file).args(["-w", w]).output().expect("run");
                assert!(o.status.success(), "{bin:?} -w {w}: {}", String::from_utf8_lossy(&o.stderr));
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            assert_eq!(out(&keel_bin()), out(&utl), "the status of {name}'s snapshot, -w {w}");
        }
    }
}

/// What a client sees of a restored member: the current revision, a read at the snapshot's
/// revision, a watch from it, the next put's revision.
async fn after_restore(ep: &str, old: i64) -> (i64, String, i64, i64) {
    let ch = channel(ep).await;
    let mut kv = KvClient::new(ch.clone());
    let cur = kv.range(RangeRequest { key: b"k0".to_vec(), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    let at_old = match kv.range(RangeRequest { key: b"k0".to_vec(), revision: old, ..Default::default() }).await {
        Ok(r) => format!("{} kvs", r.into_inner().kvs.len()),
        Err(e) => format!("{:?}: {}", e.code(), e.message()),
    };
    let mut w = keel_proto::etcdserverpb::watch_client::WatchClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let create = watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
        key: b"k".to_vec(),
        range_end: b"l".to_vec(),
        start_revision: old,
        ..Default::default()
    });
    tx.send(WatchRequest { request_union: Some(create) }).await.unwrap();
    let mut s = w.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut compacted = 0;
    while let Some(m) = s.message().await.unwrap() {
        if m.canceled || !m.events.is_empty() {
            compacted = m.compact_revision;
            break;
        }
    }
    let put = kv.put(put("after", "1")).await.unwrap().into_inner().header.unwrap().revision;
    (cur, at_old, compacted, put)
}

/// `keel snapshot restore --bump-revision N --mark-compacted` (Kubernetes' restore procedure)
/// leaves what etcdutl's does: the revision N past the snapshot's, everything before it
/// compacted (a watch from before the restore is told so), writes going on from there; and the
/// flags are refused alone as etcdutl refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_bumps_the_revision_and_marks_it_compacted_as_etcdutl() {
    let Some(e) = etcd("3.6") else { return };
    let utl = e.utl.clone().expect("etcdutl 3.6");
    let tmp = tempfile::tempdir().unwrap();
    let src = Node::new("src", "127.0.0.1");
    let mut p = src.start(&e.server, &tmp.path().join("src.etcd"), &format!("src={}", src.purl()));
    let mut kv = KvClient::new(channel(&src.curl()).await);
    let mut old = 0;
    for i in 0..10 {
        old = kv.put(put(&format!("k{i}"), "v")).await.unwrap().into_inner().header.unwrap().revision;
    }
    let file = tmp.path().join("s.snapshot");
    save_snapshot(&src.curl(), &file).await;
    p.stop();
    let refused = Command::new(keel_bin()).args(["snapshot", "restore"]).arg(&file).args(["--bump-revision", "5"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(128));
    assert_eq!(String::from_utf8_lossy(&refused.stderr).trim(), "Error: --mark-compacted required if --revision-bump > 0");
    let mut seen = Vec::new();
    for (name, tool, server) in [("etcd", utl.clone(), e.server.clone()), ("keel", keel_bin(), keel_bin())] {
        let n = Node::new(name, "127.0.0.1");
        let ic = format!("{name}={}", n.purl());
        let dir = tmp.path().join(format!("{name}.etcd"));
        run(Command::new(&tool).args(["snapshot", "restore"]).arg(&file).args(n.restore_args(&dir, &ic)).args([
            "--bump-revision",
            "1000",
            "--mark-compacted",
        ]));
        let mut p = n.start(&server, &dir, &ic);
        seen.push(after_restore(&n.curl(), old).await);
        p.stop();
    }
    eprintln!("after the restores (etcd, keel): {seen:?}");
    assert_eq!(seen[0].0, old + 1000, "etcd's revision after the restore");
    assert_eq!(
        seen[1], seen[0],
        "Keel after `keel snapshot restore` against etcd after etcdutl's (revision, read at {old}, watch from it, next put)"
    );
}

//! etcd's corruption checks on Keel members: a member whose backend was changed behind its back
//! (as etcd's e2e tests change one with `CorruptBBolt`: every stored key's and value's first
//! byte bumped) is refused at restart by the initial check, and alarmed CORRUPT by the leader's
//! periodic check and by its compaction hash check. And the peers' `/members/hashkv` answers
//! as etcd 3.7.3's, which etcd members of a mixed cluster ask.
//!
//! Needs etcd 3.7.3 (`scripts/etcd-ref.sh v3.7.3`) for the last; skipped only when
//! `KEEL_SKIP_ETCD_ORACLE=1`.

mod common;

use common::*;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{
    alarm_request, AlarmMember, AlarmRequest, AlarmType, CompactionRequest, DeleteRangeRequest, PutRequest, StatusRequest,
};
use prost::Message;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// etcd's `CorruptBBolt` on a stopped Keel member's backend: every stored key-value's first key
/// and value byte bumped.
fn corrupt_backend(dir: &Path) {
    let db = keel_mvcc::backend::Backend::open(&dir.join("member/snap/db")).expect("open the backend");
    let meta = db.read_meta().expect("meta");
    let mut changes = keel_mvcc::backend::Changes::new();
    db.scan(|k, v| {
        let mut kv = keel_proto::mvccpb::KeyValue::decode(v).expect("a stored key-value");
        kv.key[0] = kv.key[0].wrapping_add(1);
        if let Some(b) = kv.value.first_mut() {
            *b = b.wrapping_add(1);
        }
        changes.insert(k.to_vec(), Some(kv.encode_to_vec().into()));
        Ok(())
    })
    .expect("scan");
    assert!(!changes.is_empty());
    db.commit(&changes, &Default::default(), &meta).expect("commit");
}

struct Cluster {
    nodes: Vec<Node>,
    dirs: Vec<PathBuf>,
    procs: Vec<Proc>,
    ic: String,
    extra: Vec<String>,
}

impl Cluster {
    fn start(base: &Path, first_ip: u8, extra: &[&str]) -> Cluster {
        let nodes: Vec<Node> = (0..3).map(|i| Node::new(&format!("c{i}"), &format!("127.0.0.{}", first_ip + i))).collect();
        let ic = nodes.iter().map(|n| format!("{}={}", n.name, n.purl())).collect::<Vec<_>>().join(",");
        let dirs: Vec<PathBuf> = nodes.iter().map(|n| base.join(&n.name)).collect();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut c = Cluster { nodes, dirs, procs: Vec::new(), ic, extra };
        c.procs = (0..3).map(|i| c.spawn(i, &[])).collect();
        for (p, n) in c.procs.iter_mut().zip(&c.nodes) {
            assert!(p.wait_ready(), "{} did not start:\n{}", n.name, p.log_text());
        }
        c
    }

    fn spawn(&self, i: usize, more: &[&str]) -> Proc {
        let mut args = self.nodes[i].args(&self.dirs[i], &self.ic);
        args.extend(self.extra.iter().cloned());
        args.extend(more.iter().map(|s| s.to_string()));
        spawn(&keel_bin(), &self.dirs[i], &self.nodes[i].curl(), &args)
    }

    fn url(&self, i: usize) -> String {
        self.nodes[i].curl()
    }

    /// Puts 10 keys through member 1 and waits until every member applied them.
    async fn put_and_settle(&self) -> i64 {
        let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(channel(&self.url(1)));
        let mut rev = 0;
        for i in 0..10 {
            let r = kv.put(PutRequest { key: format!("foo{i:05}").into(), value: format!("v{i:05}").into(), ..Default::default() }).await;
            rev = r.unwrap().into_inner().header.unwrap().revision;
        }
        for i in 0..3 {
            let url = self.url(i);
            retry(&format!("member {i} at revision {rev}"), Duration::from_secs(30), || async {
                let s = MaintenanceClient::new(channel(&url)).status(StatusRequest {}).await.map_err(|e| e.to_string())?.into_inner();
                let (applied, commit) = (s.raft_applied_index, s.raft_index);
                let r = s.header.unwrap_or_default().revision;
                if r == rev && applied >= commit {
                    Ok(())
                } else {
                    Err(format!("revision {r}"))
                }
            })
            .await;
        }
        rev
    }

    async fn member_id(&self, i: usize) -> u64 {
        let s = MaintenanceClient::new(channel(&self.url(i))).status(StatusRequest {}).await.unwrap().into_inner();
        s.header.unwrap().member_id
    }
}

async fn alarms(url: &str) -> Result<Vec<AlarmMember>, String> {
    let get = AlarmRequest { action: alarm_request::AlarmAction::Get as i32, member_id: 0, alarm: AlarmType::None as i32 };
    Ok(MaintenanceClient::new(channel(url)).alarm(get).await.map_err(|e| e.to_string())?.into_inner().alarms)
}

/// Waits until the cluster's alarms are exactly the CORRUPT alarm of `id`.
async fn corrupt_alarm_on(url: &str, id: u64) {
    let want = vec![AlarmMember { member_id: id, alarm: AlarmType::Corrupt as i32 }];
    retry(&format!("the CORRUPT alarm of {id:x}"), Duration::from_secs(30), || async {
        let got = alarms(url).await?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_member_is_refused_at_restart_and_alarmed_by_the_periodic_check() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), 41, &["--corrupt-check-time", "1s"]);
    c.put_and_settle().await;
    let id0 = c.member_id(0).await;
    assert_eq!(alarms(&c.url(1)).await.unwrap(), vec![], "no alarm while the members agree");

    assert_eq!(c.procs[0].stop(), Some(0), "{}", c.procs[0].log_text());
    corrupt_backend(&c.dirs[0]);
    // The initial check (etcd 3.7's gate, and etcd 3.6's flag) refuses to serve.
    for gate in ["--feature-gates=InitialCorruptCheck=true", "--experimental-initial-corrupt-check"] {
        let mut p = c.spawn(0, &[gate]);
        assert_eq!(p.wait_ready_for(Duration::from_secs(60)), Some(false), "{gate}: the member served:\n{}", p.log_text());
        assert_ne!(p.wait_exit(), Some(0));
        assert!(p.log_text().contains(&format!("{id0:x} found data inconsistency with peers")), "{}", p.log_text());
    }
    // Without it the member serves, and the leader's periodic check finds it.
    c.procs[0] = c.spawn(0, &[]);
    assert!(c.procs[0].wait_ready(), "{}", c.procs[0].log_text());
    corrupt_alarm_on(&c.url(1), id0).await;
    // A corrupt cluster takes no more writes (etcd's answer).
    let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(channel(&c.url(2)));
    let e = kv.put(PutRequest { key: b"after".to_vec(), value: b"x".to_vec(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.message(), "etcdserver: corrupt cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_member_is_alarmed_by_the_compaction_hash_check() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(tmp.path(), 44, &["--feature-gates=CompactHashCheck=true", "--compact-hash-check-time", "1s"]);
    c.put_and_settle().await;
    let id0 = c.member_id(0).await;
    assert_eq!(c.procs[0].stop(), Some(0), "{}", c.procs[0].log_text());
    corrupt_backend(&c.dirs[0]);
    c.procs[0] = c.spawn(0, &[]);
    assert!(c.procs[0].wait_ready(), "{}", c.procs[0].log_text());
    // No periodic check runs: nothing is found until a compaction gives hashes to compare.
    assert_eq!(alarms(&c.url(1)).await.unwrap(), vec![]);
    let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(channel(&c.url(1)));
    kv.compact(CompactionRequest { revision: 5, physical: true }).await.unwrap();
    corrupt_alarm_on(&c.url(1), id0).await;
}

/// `GET /members/hashkv` with `body` and the cluster ID header `cid` on the peer URL `purl`:
/// (status, body).
///
/// The connection is kept alive and the response read to its end: a request marked
/// `Connection: close` lets etcd's Go server answer a refusal without reading the request's
/// body and then close with that body unread, which resets the connection and can lose the
/// answer on a loaded machine.
fn hash_kv(purl: &str, method: &str, body: &str, cid: Option<&str>) -> (u16, String) {
    let addr = purl.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let cid = cid.map(|c| format!("X-Etcd-Cluster-ID: {c}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} /members/hashkv HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{cid}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body) = loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let length = lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
            let done = match length {
                Some(n) => rest.len() >= n,
                // Chunked: the last chunk is empty.
                None => rest.ends_with("0\r\n\r\n"),
            };
            if done {
                // Keel answers with a length, etcd's Go server chunked or with a length.
                let body = if length.is_some() { rest.to_string() } else { dechunk(rest) };
                break (head.to_string(), body);
            }
        }
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("{method} {purl} {body:?}: {e}"));
        assert!(n > 0, "{method} {purl} {body:?}: the connection ended after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    };
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_hashkv_answers_as_etcd_3_7() {
    let Some(e) = etcd("v3.7.3") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut answers = Vec::new();
    for (bin, ip) in [(e.server.clone(), "127.0.0.47"), (keel_bin(), "127.0.0.48")] {
        let n = Node::new("h1", ip);
        let dir = tmp.path().join(ip);
        let mut p = spawn(&bin, &dir, &n.curl(), &n.args(&dir, &format!("h1={}", n.purl())));
        assert!(p.wait_ready(), "{}", p.log_text());
        let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(channel(&n.curl()));
        for (k, v) in [("a", "1"), ("b", "2"), ("a", "3")] {
            kv.put(PutRequest { key: k.into(), value: v.into(), ..Default::default() }).await.unwrap();
        }
        kv.delete_range(DeleteRangeRequest { key: b"b".to_vec(), ..Default::default() }).await.unwrap();
        kv.compact(CompactionRequest { revision: 3, physical: true }).await.unwrap();
        kv.put(PutRequest { key: b"c".to_vec(), value: b"4".to_vec(), ..Default::default() }).await.unwrap();
        let cid = format!(
            "{:x}",
            MaintenanceClient::new(channel(&n.curl())).status(StatusRequest {}).await.unwrap().into_inner().header.unwrap().cluster_id
        );
        // The hash stored by the compaction at 3 (computed before it: it starts from no
        // compaction, -1) is what revision 3 gets, once the compaction stored it.
        let purl = n.purl();
        retry("the compaction's hash", Duration::from_secs(30), || async {
            let (status, body) = hash_kv(&purl, "GET", r#"{"revision":3}"#, Some(&cid));
            if status == 200 && body.contains(r#""compact_revision":-1"#) {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await;
        let mut got = Vec::new();
        for (what, method, body, cid) in [
            ("current", "GET", "{}", Some(cid.as_str())),
            ("at the compaction", "GET", r#"{"revision":3}"#, Some(cid.as_str())),
            ("after it", "GET", r#"{"revision":4}"#, None),
            ("compacted", "GET", r#"{"revision":2}"#, None),
            ("future", "GET", r#"{"revision":100}"#, None),
            ("not JSON", "GET", "revision", None),
            ("wrong cluster", "GET", "{}", Some("1234")),
            ("POST", "POST", "{}", None),
        ] {
            let (status, body) = hash_kv(&purl, method, body, cid);
            let body = match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => v.to_string(),
                Err(_) => body,
            };
            got.push(format!("{what}: {status} {body}"));
        }
        answers.push(got);
        p.stop();
    }
    assert_eq!(answers[1], answers[0], "Keel (right) answers as etcd 3.7.3 (left)");
}

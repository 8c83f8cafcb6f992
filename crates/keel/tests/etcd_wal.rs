//! A Keel member's `member/wal` is in etcd's WAL format: etcd's own wal package (v3.6.16, run by
//! `scripts/fixtures/etcdwal` with Go) verifies it and reads back the member's identity, hard
//! state, snapshot records and every request as etcd's `InternalRaftRequest`, as etcd's
//! robustness suite and tools read a member's WAL.

mod common;

use common::*;
use keel_proto::etcdserverpb::{DeleteRangeRequest, PutRequest};
use std::path::Path;
use std::process::Command;

/// Runs the Go reader on `data_dir`; None (skipping) without Go when KEEL_SKIP_ETCD_ORACLE=1.
fn etcd_read_wal(data_dir: &Path) -> Option<String> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fixtures/etcdwal");
    let out = match Command::new("go").args(["run", "."]).arg(data_dir).current_dir(&fixture).env("GOFLAGS", "-mod=mod").output() {
        Ok(o) => o,
        Err(e) if std::env::var("KEEL_SKIP_ETCD_ORACLE").as_deref() == Ok("1") => {
            eprintln!("skipping: go cannot run ({e}) and KEEL_SKIP_ETCD_ORACLE=1");
            return None;
        }
        Err(e) => panic!("go is needed to run etcd's WAL reader ({e}); KEEL_SKIP_ETCD_ORACLE=1 skips"),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "etcd's WAL reader refused Keel's WAL: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    Some(text)
}

fn field(line: &str, name: &str) -> u64 {
    let v = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap_or_else(|| panic!("no {name} in {line}"));
    v.parse().unwrap_or_else(|_| panic!("{name} in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_wal_reader_reads_a_keel_members_wal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w.etcd");
    let (cp, pp) = (free_port(), free_port());
    // A snapshot every 20 entries: the WAL holds snapshot records beside the entries.
    let mut p = start(&keel_bin(), &dir, cp, pp, &["--snapshot-count", "20"]);
    assert!(p.wait_ready(), "{}", p.log_text());
    let mut kv = p.kv().await;
    let mut header = None;
    for i in 1..=30 {
        let r = kv.put(PutRequest { key: format!("k{i:03}").into(), value: format!("v{i}").into(), ..Default::default() }).await.unwrap();
        header = r.into_inner().header;
    }
    kv.delete_range(DeleteRangeRequest { key: b"k003".to_vec(), ..Default::default() }).await.unwrap();
    let header = header.expect("a response header");
    assert_eq!(p.stop(), Some(0), "{}", p.log_text());

    let Some(out) = etcd_read_wal(&dir) else { return };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("metadata member={:x} cluster={:x}", header.member_id, header.cluster_id), "{out}");
    let hs = lines.iter().find(|l| l.starts_with("hardstate ")).expect("a hard state");
    let snaps: Vec<u64> = lines.iter().filter(|l| l.starts_with("snapshot ")).map(|l| field(l, "index")).collect();
    assert_eq!(snaps.first(), Some(&0), "the WAL begins with etcd's empty snapshot record: {out}");
    let newest = *snaps.iter().max().unwrap();
    assert!(newest >= 20, "a snapshot record at the snapshot taken: {snaps:?}");
    // etcd's raft refuses to restart from a hard state whose commit is below its snapshot.
    assert!(field(hs, "commit") >= newest, "hard state {hs} behind the snapshot at {newest}");
    let puts: Vec<&str> = lines.iter().filter(|l| l.contains(" put ")).map(|l| l.rsplit("key=").next().unwrap()).collect();
    let want: Vec<String> = (1..=30).map(|i| format!("k{i:03}")).collect();
    assert_eq!(puts, want, "every put, in order: {out}");
    assert!(lines.iter().any(|l| l.ends_with(" delete key=k003")), "{out}");
    let indexes: Vec<u64> = lines.iter().filter(|l| l.starts_with("entry ")).map(|l| field(l, "index")).collect();
    assert!(indexes.windows(2).all(|w| w[1] == w[0] + 1) && indexes.first() == Some(&1), "entries 1.. without gaps: {indexes:?}");

    // Keel reads back what it wrote, and serves it.
    let mut p2 = start(&keel_bin(), &dir, cp, pp, &["--snapshot-count", "20"]);
    assert!(p2.wait_ready(), "{}", p2.log_text());
    let mut kv = p2.kv().await;
    let r = kv
        .range(keel_proto::etcdserverpb::RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 29);
}

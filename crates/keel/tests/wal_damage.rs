//! WAL damage on disk: corruption refuses to start with a clear error; a torn tail is repaired;
//! a backend older than the newest raft snapshot refuses to start instead of missing entries.

mod common;

use common::*;
use keel_proto::etcdserverpb::{PutRequest, RangeRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_closed_segment_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flip.etcd");
    let (cp, pp) = (free_port(), free_port());
    let mut p = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(p.wait_ready(), "{}", p.log_text());
    let mut kv = p.kv().await;
    // Enough data to fill the first 64 MB segment and start a second one.
    let value = vec![b'x'; 1_400_000];
    let mut i = 0;
    while wal_segments(&dir).len() < 2 {
        kv.put(PutRequest { key: format!("big/{i}").into(), value: value.clone(), ..Default::default() }).await.unwrap();
        i += 1;
        assert!(i < 200, "WAL never cut a second segment");
    }
    p.sigkill();

    let first = wal_segments(&dir)[0].clone();
    let mut bytes = std::fs::read(&first).unwrap();
    let off = 20_000_000;
    bytes[off] ^= 0x5a;
    std::fs::write(&first, &bytes).unwrap();

    let mut p2 = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(!p2.wait_ready(), "server started on a corrupt WAL");
    assert_ne!(p2.wait_exit(), Some(0));
    let log = p2.log_text();
    let name = first.file_name().unwrap().to_string_lossy().to_string();
    assert!(log.contains("corrupt") && log.contains(&name) && log.contains("offset"), "error does not name the file and offset:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_record_is_truncated_and_server_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("torn.etcd");
    let (cp, pp) = (free_port(), free_port());
    let mut p = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(p.wait_ready(), "{}", p.log_text());
    let mut kv = p.kv().await;
    for i in 0..50 {
        kv.put(PutRequest { key: format!("k{i:03}").into(), value: format!("v{i}").into(), ..Default::default() }).await.unwrap();
    }
    p.sigkill();

    // Cut the last record in half: its length now runs past the end of the file.
    let last = wal_segments(&dir).pop().unwrap();
    let bytes = std::fs::read(&last).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 1;
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len((end - 6) as u64).unwrap();
    drop(f);

    let mut p2 = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(p2.wait_ready(), "server did not start after a torn tail:\n{}", p2.log_text());
    assert!(p2.log_text().contains("torn"), "no warning about the torn record");
    let mut kv = p2.kv().await;
    kv.put(PutRequest { key: b"after".to_vec(), value: b"ok".to_vec(), ..Default::default() }).await.unwrap();
    let r = kv.range(RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    assert!(r.count >= 49, "lost more than the torn record: {} keys", r.count);
}

/// The raft log starts after its newest snapshot: a backend from before it (copied back by hand)
/// would silently miss every entry up to the snapshot. Found by etcd 3.6's
/// TestBreakConsistentIndexNewerThanSnapshot: Keel started and served 24 of 120 keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_older_than_the_newest_snapshot_refuses_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("old.etcd");
    let (cp, pp) = (free_port(), free_port());
    let db = dir.join("member/snap/db");
    let mut p = start(&keel_bin(), &dir, cp, pp, &["--snapshot-count", "50"]);
    assert!(p.wait_ready(), "{}", p.log_text());
    p.kv().await.put(PutRequest { key: b"first".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(p.stop(), Some(0));
    let old = std::fs::read(&db).unwrap();

    let mut p = start(&keel_bin(), &dir, cp, pp, &["--snapshot-count", "50"]);
    assert!(p.wait_ready(), "{}", p.log_text());
    let mut kv = p.kv().await;
    for i in 0..120 {
        kv.put(PutRequest { key: format!("k{i:03}").into(), ..Default::default() }).await.unwrap();
    }
    assert_eq!(p.stop(), Some(0));
    let snaps = std::fs::read_dir(dir.join("member/snap"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "snap"))
        .count();
    assert!(snaps > 0, "120 writes with --snapshot-count 50 made no snapshot");

    std::fs::write(&db, &old).unwrap();
    let mut p = start(&keel_bin(), &dir, cp, pp, &["--snapshot-count", "50"]);
    assert!(!p.wait_ready(), "the member started on a backend older than its snapshot");
    assert_ne!(p.wait_exit(), Some(0));
    let log = p.log_text();
    assert!(log.contains("failed to find database snapshot file (snap: snapshot file doesn't exist)"), "{log}");
}

//! Snapshots every --snapshot-count applied entries, and recovery from snapshot + WAL once the
//! WAL before the snapshot is gone (it is released when a later segment holds the snapshot and
//! the raft log keeps none of its entries for followers: the last --snapshot-catchup-entries
//! applied ones, read back from the WAL past --raft-log-memory-bytes).

mod common;

use common::*;
use keel_proto::etcdserverpb::{PutRequest, RangeRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_taken_and_recovered_from() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap.etcd");
    let (cp, pp) = (free_port(), free_port());
    let flags = ["--snapshot-count", "50", "--snapshot-catchup-entries", "20"];
    let mut p = start(&keel_bin(), &dir, cp, pp, &flags);
    assert!(p.wait_ready(), "{}", p.log_text());
    let mut kv = p.kv().await;
    for i in 0..300 {
        kv.put(PutRequest { key: format!("s{i:04}").into(), value: format!("{i}").into(), ..Default::default() }).await.unwrap();
    }
    // Past one 64 MB WAL segment, so that the first one is released after a snapshot (the log
    // keeps only the last 20 entries for followers) and the restart below cannot replay the log
    // from its beginning.
    for i in 0..70u8 {
        kv.put(PutRequest { key: b"big".to_vec(), value: vec![i; 1 << 20], ..Default::default() }).await.unwrap();
    }
    for i in 0..60 {
        kv.put(PutRequest { key: format!("t{i:04}").into(), value: b"x".to_vec(), ..Default::default() }).await.unwrap();
    }
    // The snapshot goes once the backend commit that makes its index durable is done (a batch
    // interval or two after it falls due), and releases the first segment then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let segs = wal_segments(&dir);
        let first = segs.first().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !first.starts_with("0000000000000000-") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the first WAL segment was not released: {segs:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let snaps: Vec<_> = std::fs::read_dir(dir.join("member/snap"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .collect();
    assert!(!snaps.is_empty(), "no snapshot file after 430 entries with --snapshot-count 50");
    assert!(snaps.len() <= 5, "old snapshot files are not purged: {}", snaps.len());
    p.sigkill();

    let mut p2 = start(&keel_bin(), &dir, cp, pp, &flags);
    assert!(p2.wait_ready(), "{}", p2.log_text());
    let mut kv = p2.kv().await;
    let r = kv.range(RangeRequest { key: b"s".to_vec(), range_end: b"u".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.count, 300 + 60);
    let big = kv.range(RangeRequest { key: b"big".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(big.kvs[0].value, vec![69u8; 1 << 20]);
    let rev = r.header.unwrap().revision;
    let put = kv.put(PutRequest { key: b"after".to_vec(), value: b"x".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(put.header.unwrap().revision, rev + 1, "revision continues after recovery");
}

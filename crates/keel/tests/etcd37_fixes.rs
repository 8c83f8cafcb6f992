//! Reproductions of the bugs etcd 3.7 (and its backports) fixed, run against Keel and, where
//! the fixed etcd's answer is the reference, against real etcd 3.7.3 beside it:
//! - etcd#20221: a watch from a future revision, with progress notifications, received events
//!   older than the revision it asked for;
//! - etcd#18089 and #19179: a watch from the compaction revision missed the delete at that
//!   revision;
//! - etcd#17780: the revision went back after a crash during (or right after) a compaction whose
//!   last revision was a delete.
//!
//! The stale reads of a paused leader (etcd#20418, #21375, #21399) are keel-chaos's: its
//! `pause-leader` fault and the negative control in scripts/chaos.sh.
//!
//! Needs etcd 3.7.3 (`scripts/etcd-ref.sh v3.7.3`); skipped only when `KEEL_SKIP_ETCD_ORACLE=1`.

mod common;

use common::*;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::*;
use keel_proto::mvccpb::event::EventType;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest { key: k.into(), value: v.into(), ..Default::default() }
}

/// Deletes `[key, end)`; the revision of the delete.
async fn delete(kv: &mut KvClient<Channel>, key: &str, end: &str) -> i64 {
    let r = DeleteRangeRequest { key: key.into(), range_end: end.into(), ..Default::default() };
    kv.delete_range(r).await.unwrap().into_inner().header.unwrap().revision
}

async fn current(kv: &mut KvClient<Channel>) -> i64 {
    kv.range(RangeRequest { key: b"\0".to_vec(), count_only: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision
}

/// Opens a watch with `create` on `ch`: the request sender (for progress requests) and the
/// response stream.
async fn watch(ch: Channel, create: WatchCreateRequest) -> (mpsc::Sender<WatchRequest>, tonic::Streaming<WatchResponse>) {
    let (tx, rx) = mpsc::channel(16);
    tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await.unwrap();
    let s = WatchClient::new(ch).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, s)
}

fn progress() -> WatchRequest {
    WatchRequest { request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})) }
}

/// etcd#20221: a watch from 5 revisions ahead, with progress notifications (every 100 ms, and
/// asked for between writes), gets every event from that revision on and none before it.
async fn future_watch(ep: &str) -> Vec<(i64, String)> {
    let ch = channel(ep);
    let mut kv = KvClient::new(ch.clone());
    let start = current(&mut kv).await + 5;
    let create = WatchCreateRequest {
        key: b"f/".to_vec(),
        range_end: b"f0".to_vec(),
        start_revision: start,
        progress_notify: true,
        ..Default::default()
    };
    let (tx, mut s) = watch(ch, create).await;
    let created = s.message().await.unwrap().unwrap();
    assert!(created.created);
    for i in 0..12 {
        tx.send(progress()).await.unwrap();
        kv.put(put(&format!("f/{}", i % 3), &i.to_string())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let last = current(&mut kv).await;
    let mut seen = Vec::new();
    while seen.last().map(|(r, _)| *r) != Some(last) {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message()).await.expect("events up to the last put").unwrap().unwrap();
        for e in m.events {
            let kv = e.kv.unwrap_or_default();
            assert!(kv.mod_revision >= start, "{ep}: an event at {} on a watch from {start}", kv.mod_revision);
            seen.push((kv.mod_revision, String::from_utf8_lossy(&kv.key).into_owned()));
        }
    }
    seen.iter().map(|(r, k)| (r - start, k.clone())).collect()
}

/// etcd#18089, #19179: with a delete at the compaction revision, a watch from that revision
/// gets the delete; one from before it is told it is compacted.
async fn delete_at_compaction(ep: &str) -> (Vec<(String, i64, i32)>, i64) {
    let ch = channel(ep);
    let mut kv = KvClient::new(ch.clone());
    kv.put(put("d/a", "1")).await.unwrap();
    kv.put(put("d/b", "1")).await.unwrap();
    let del = delete(&mut kv, "d/a", "").await;
    kv.put(put("d/b", "2")).await.unwrap();
    kv.compact(CompactionRequest { revision: del, physical: true }).await.unwrap();
    let create = WatchCreateRequest { key: b"d/".to_vec(), range_end: b"d0".to_vec(), start_revision: del, ..Default::default() };
    let (_tx, mut s) = watch(ch.clone(), create).await;
    let mut events = Vec::new();
    while events.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(10), s.message()).await.expect("events").unwrap().unwrap();
        assert!(!m.canceled, "{ep}: the watch from the compaction revision was canceled: {m:?}");
        for e in m.events {
            let kv = e.kv.unwrap_or_default();
            events.push((String::from_utf8_lossy(&kv.key).into_owned(), kv.mod_revision - del, e.r#type));
        }
    }
    let before = WatchCreateRequest { key: b"d/".to_vec(), range_end: b"d0".to_vec(), start_revision: del - 1, ..Default::default() };
    let (_tx, mut s) = watch(ch, before).await;
    let m = s.message().await.unwrap().unwrap();
    let m = if m.canceled || m.compact_revision != 0 { m } else { s.message().await.unwrap().unwrap() };
    (events, m.compact_revision - del)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_from_future_and_compaction_revisions_answer_as_etcd_3_7() {
    let Some(e) = etcd("v3.7.3") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--watch-progress-notify-interval=100ms"];
    let mut ep = start(&e.server, &tmp.path().join("etcd.etcd"), free_port(), free_port(), &flags);
    let mut kp = start(&keel_bin(), &tmp.path().join("keel.etcd"), free_port(), free_port(), &flags);
    assert!(ep.wait_ready(), "etcd did not start: {}", ep.log_text());
    assert!(kp.wait_ready(), "keel did not start: {}", kp.log_text());
    let (want, got) = (future_watch(&ep.endpoint()).await, future_watch(&kp.endpoint()).await);
    assert_eq!(got, want, "events of a watch from a future revision (revision - start, key)");
    assert_eq!(want.len(), 8, "12 puts, the first 4 before the watch's revision");
    let (want, got) = (delete_at_compaction(&ep.endpoint()).await, delete_at_compaction(&kp.endpoint()).await);
    assert_eq!(got, want, "a watch from the compaction revision (key, revision - compaction, type), and from before it");
    assert_eq!(want.0.first(), Some(&("d/a".to_string(), 0, EventType::Delete as i32)), "etcd 3.7.3 sends the delete");
}

/// etcd#17780: the last revision is a delete; compacted at it, the member killed during the
/// compaction or just after, it restarts at the same revision and the next write goes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revision_never_goes_back_after_a_kill_around_a_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keel.etcd");
    let (cport, pport) = (free_port(), free_port());
    // Slow compaction batches (one key, 50 ms apart): the first kill lands in the middle of one.
    let flags = ["--compaction-batch-limit=1", "--compaction-sleep-interval=50ms"];
    let mut kp = start(&keel_bin(), &dir, cport, pport, &flags);
    assert!(kp.wait_ready(), "keel did not start: {}", kp.log_text());
    let mut kv = KvClient::new(channel(&kp.endpoint()));
    for round in 0..2 {
        for i in 0..20 {
            kv.put(put(&format!("r/{i}"), &round.to_string())).await.unwrap();
        }
        let last = delete(&mut kv, "r/", "r0").await;
        kv.compact(CompactionRequest { revision: last, physical: round == 1 }).await.unwrap();
        kp.sigkill();
        kp = start(&keel_bin(), &dir, cport, pport, &flags);
        assert!(kp.wait_ready(), "keel did not restart: {}", kp.log_text());
        kv = KvClient::new(channel(&kp.endpoint()));
        assert_eq!(current(&mut kv).await, last, "round {round}: the revision after the restart");
        let next = kv.put(put("r/after", "x")).await.unwrap().into_inner().header.unwrap().revision;
        assert_eq!(next, last + 1, "round {round}: the next write");
    }
}

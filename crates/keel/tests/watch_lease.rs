//! Watch guarantees (ordered, unique, no gaps, atomic, resumable, prev_kv, compaction), a slow
//! watcher that falls behind and catches up, lease expiry deleting keys with DELETE events, and
//! the server-side Lock and Election services.

mod common;

use common::*;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::*;
use keel_proto::mvccpb::event::EventType;
use keel_proto::v3electionpb::election_client::ElectionClient;
use keel_proto::v3electionpb::{CampaignRequest, LeaderRequest, ProclaimRequest, ResignRequest};
use keel_proto::v3lockpb::lock_client::LockClient;
use keel_proto::v3lockpb::{LockRequest, UnlockRequest};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;

async fn start_one(dir: &std::path::Path) -> (Proc, Channel) {
    let mut p = start(&keel_bin(), dir, free_port(), free_port(), &[]);
    assert!(p.wait_ready(), "{}", p.log_text());
    let ch = Channel::from_shared(p.endpoint()).unwrap().connect().await.unwrap();
    (p, ch)
}

fn create(key: &str, end: &str, start: i64, prev_kv: bool) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.into(),
            range_end: end.into(),
            start_revision: start,
            prev_kv,
            ..Default::default()
        })),
    }
}

/// Opens a watch stream with one watcher and returns its responses' stream (created consumed).
async fn open_watch(ch: &Channel, req: WatchRequest) -> tonic::Streaming<WatchResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(req).await.unwrap();
    // Keep the request side open for the test's duration.
    std::mem::forget(tx);
    let mut s = WatchClient::new(ch.clone()).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let created = s.message().await.unwrap().unwrap();
    assert!(created.created);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_guarantees_hold_for_fast_and_slow_watchers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_p, ch) = start_one(&tmp.path().join("w.etcd")).await;
    let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(ch.clone());

    let mut fast = open_watch(&ch, create("w/", "w0", 0, true)).await;
    let mut slow = open_watch(&ch, create("w/", "w0", 0, true)).await;

    // Writes: single puts on 20 keys, and 3-key transactions (one revision each).
    let mut fast_early: Vec<WatchResponse> = Vec::new();
    let mut expected: Vec<(i64, Vec<(String, String)>)> = Vec::new();
    for i in 0..3000 {
        if i % 10 == 9 {
            let ops = (0..3)
                .map(|j| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: format!("w/t{j}").into(),
                        value: format!("{i}").into(),
                        ..Default::default()
                    })),
                })
                .collect();
            let r = kv.txn(TxnRequest { success: ops, ..Default::default() }).await.unwrap().into_inner();
            expected.push((r.header.unwrap().revision, (0..3).map(|j| (format!("w/t{j}"), format!("{i}"))).collect()));
        } else {
            let k = format!("w/k{}", i % 20);
            let r = kv
                .put(PutRequest { key: k.clone().into(), value: format!("{i}").into(), ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            expected.push((r.header.unwrap().revision, vec![(k, format!("{i}"))]));
        }
        if i % 500 == 0 {
            // The fast watcher keeps up as we go; the slow one reads nothing until the end.
            while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_millis(1), fast.message()).await {
                fast_early.push(r);
            }
        }
    }
    let last_rev = expected.last().unwrap().0;

    for (name, stream, mut early) in [("fast", &mut fast, fast_early), ("slow", &mut slow, Vec::new())] {
        early.reverse();
        let mut seen_rev = 0i64;
        let mut got: HashMap<i64, Vec<(String, String)>> = HashMap::new();
        let mut prev_value: HashMap<String, String> = HashMap::new();
        while seen_rev < last_rev {
            let resp = match early.pop() {
                Some(r) => r,
                None => tokio::time::timeout(Duration::from_secs(20), stream.message()).await.expect("watch stalled").unwrap().unwrap(),
            };
            assert!(!resp.canceled, "{name} watcher cancelled: {resp:?}");
            if resp.events.is_empty() {
                continue;
            }
            let rev = resp.events[0].kv.as_ref().unwrap().mod_revision;
            assert!(rev > seen_rev, "{name}: revision {rev} after {seen_rev} (order/uniqueness)");
            for e in &resp.events {
                let kvr = e.kv.as_ref().unwrap();
                assert_eq!(kvr.mod_revision, rev, "{name}: one response mixes revisions (atomicity)");
                assert_eq!(e.r#type, EventType::Put as i32);
                let key = String::from_utf8(kvr.key.clone()).unwrap();
                let val = String::from_utf8(kvr.value.clone()).unwrap();
                // prev_kv is the value before this event.
                let prev = e.prev_kv.as_ref().map(|p| String::from_utf8(p.value.clone()).unwrap());
                assert_eq!(prev, prev_value.get(&key).cloned(), "{name}: wrong prev_kv for {key} at {rev}");
                prev_value.insert(key.clone(), val.clone());
                got.entry(rev).or_default().push((key, val));
            }
            seen_rev = rev;
        }
        // Every write seen exactly as made: no gap.
        for (rev, evs) in &expected {
            assert_eq!(got.get(rev), Some(evs), "{name}: missing or different events at revision {rev}");
        }
    }
    // Resume from a past revision gives the same history.
    let first = expected[100].0;
    let mut resumed = open_watch(&ch, create("w/", "w0", first, false)).await;
    let resp = resumed.message().await.unwrap().unwrap();
    let rev = resp.events[0].kv.as_ref().unwrap().mod_revision;
    assert_eq!(rev, first, "resume starts at the requested revision");

    // A watch from a compacted revision is cancelled with the compaction revision.
    kv.compact(CompactionRequest { revision: last_rev - 10, physical: true }).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(create("w/", "w0", 5, false)).await.unwrap();
    let mut s = WatchClient::new(ch.clone()).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut cancelled = None;
    while let Some(r) = s.message().await.unwrap() {
        if r.canceled {
            cancelled = Some(r);
            break;
        }
    }
    assert_eq!(cancelled.unwrap().compact_revision, last_rev - 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_deletes_keys_and_notifies_watchers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_p, ch) = start_one(&tmp.path().join("l.etcd")).await;
    let mut lease = LeaseClient::new(ch.clone());
    let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(ch.clone());
    let g = lease.lease_grant(LeaseGrantRequest { ttl: 1, id: 0 }).await.unwrap().into_inner();
    assert_eq!(g.ttl, 2, "TTL is raised to etcd's minimum (1.5 election timeouts, rounded up)");
    for k in ["e/a", "e/b"] {
        kv.put(PutRequest { key: k.into(), value: b"v".to_vec(), lease: g.id, ..Default::default() }).await.unwrap();
    }
    let mut w = open_watch(&ch, create("e/", "e0", 0, false)).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), w.message()).await.expect("no expiry").unwrap().unwrap();
    assert_eq!(resp.events.len(), 2, "both keys deleted in one revision");
    assert!(resp.events.iter().all(|e| e.r#type == EventType::Delete as i32));
    let ttl = lease.lease_time_to_live(LeaseTimeToLiveRequest { id: g.id, keys: false }).await.unwrap().into_inner();
    assert_eq!(ttl.ttl, -1);
    let err = kv.put(PutRequest { key: b"e/c".to_vec(), lease: g.id, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.message(), "etcdserver: requested lease not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_and_election_services() {
    let tmp = tempfile::tempdir().unwrap();
    let (_p, ch) = start_one(&tmp.path().join("c.etcd")).await;
    let mut lease = LeaseClient::new(ch.clone());
    let a = lease.lease_grant(LeaseGrantRequest { ttl: 30, id: 0 }).await.unwrap().into_inner().id;
    let b = lease.lease_grant(LeaseGrantRequest { ttl: 30, id: 0 }).await.unwrap().into_inner().id;

    // Lock: B waits until A unlocks. B is queued once its key is there (seen by a watch); it
    // must get the lock only at or after the revision of A's unlock.
    let mut lock = LockClient::new(ch.clone());
    let ka = lock.lock(LockRequest { name: b"mylock".to_vec(), lease: a }).await.unwrap().into_inner().key;
    let mut queued = open_watch(&ch, create("mylock/", "mylock0", 0, false)).await;
    let mut lock_b = lock.clone();
    let waiting = tokio::spawn(async move { lock_b.lock(LockRequest { name: b"mylock".to_vec(), lease: b }).await });
    let put = tokio::time::timeout(Duration::from_secs(5), queued.message()).await.expect("B never queued").unwrap().unwrap();
    assert_eq!(put.events[0].r#type, EventType::Put as i32);
    let unlocked = lock.unlock(UnlockRequest { key: ka }).await.unwrap().into_inner().header.unwrap().revision;
    let got = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("lock not handed over").unwrap().unwrap().into_inner();
    assert!(
        got.header.as_ref().unwrap().revision >= unlocked,
        "second locker got the lock at revision {:?}, before the first unlocked at {unlocked}",
        got.header
    );
    let kb = got.key;
    assert!(kb.starts_with(b"mylock/"));
    lock.unlock(UnlockRequest { key: kb }).await.unwrap();

    // Election: A leads, proclaims, resigns; B takes over.
    let mut el = ElectionClient::new(ch.clone());
    let la =
        el.campaign(CampaignRequest { name: b"e".to_vec(), lease: a, value: b"a".to_vec() }).await.unwrap().into_inner().leader.unwrap();
    let mut queued = open_watch(&ch, create("e/", "e0", 0, false)).await;
    let mut el_b = el.clone();
    let b_campaign =
        tokio::spawn(async move { el_b.campaign(CampaignRequest { name: b"e".to_vec(), lease: b, value: b"b".to_vec() }).await });
    tokio::time::timeout(Duration::from_secs(5), queued.message()).await.expect("B never campaigned").unwrap().unwrap();
    el.proclaim(ProclaimRequest { leader: Some(la.clone()), value: b"a2".to_vec() }).await.unwrap();
    let now = el.leader(LeaderRequest { name: b"e".to_vec() }).await.unwrap().into_inner().kv.unwrap();
    assert_eq!(now.value, b"a2", "the leader's proclamation while B waits");
    let resigned = el.resign(ResignRequest { leader: Some(la) }).await.unwrap().into_inner().header.unwrap().revision;
    let won = tokio::time::timeout(Duration::from_secs(5), b_campaign).await.expect("B never became leader").unwrap().unwrap().into_inner();
    assert!(won.header.as_ref().unwrap().revision >= resigned, "B won at revision {:?}, before A resigned at {resigned}", won.header);
    let now = el.leader(LeaderRequest { name: b"e".to_vec() }).await.unwrap().into_inner().kv.unwrap();
    assert_eq!(now.value, b"b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_and_fragments() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = start(
        &keel_bin(),
        &tmp.path().join("p.etcd"),
        free_port(),
        free_port(),
        &["--experimental-watch-progress-notify-interval", "200ms", "--max-request-bytes", "4096"],
    );
    assert!(p.wait_ready(), "{}", p.log_text());
    let ch = Channel::from_shared(p.endpoint()).unwrap().connect().await.unwrap();
    let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(ch.clone());
    let rev = kv
        .put(PutRequest { key: b"p/a".to_vec(), value: b"1".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;

    // Periodic progress for a watcher that asked for it, at the current revision.
    let req = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"p/".to_vec(),
            range_end: b"p0".to_vec(),
            progress_notify: true,
            fragment: true,
            prev_kv: true,
            ..Default::default()
        })),
    };
    let mut w = open_watch(&ch, req).await;
    let r = tokio::time::timeout(Duration::from_secs(5), w.message()).await.expect("no progress notification").unwrap().unwrap();
    assert!(r.events.is_empty() && !r.canceled && !r.created);
    assert_eq!(r.header.unwrap().revision, rev);

    // A transaction whose watch response (with prev_kv) is bigger than --max-request-bytes
    // arrives in fragments, reassembled whole.
    let ops: Vec<RequestOp> = (0..20)
        .map(|i| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: format!("p/{i:02}").into(),
                value: vec![b'x'; 150],
                ..Default::default()
            })),
        })
        .collect();
    let first = kv.txn(TxnRequest { success: ops.clone(), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    let trev = kv.txn(TxnRequest { success: ops, ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    // Skip the first transaction's events.
    let mut seen_first = 0;
    while seen_first < 20 {
        let r = tokio::time::timeout(Duration::from_secs(5), w.message()).await.expect("stalled").unwrap().unwrap();
        seen_first += r.events.iter().filter(|e| e.kv.as_ref().unwrap().mod_revision == first).count();
    }
    let mut events = Vec::new();
    let mut fragments = 0;
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), w.message()).await.expect("stalled").unwrap().unwrap();
        if r.events.is_empty() {
            continue; // progress
        }
        assert!(r.events.iter().all(|e| e.kv.as_ref().unwrap().mod_revision == trev));
        events.extend(r.events);
        if !r.fragment {
            break;
        }
        fragments += 1;
    }
    assert!(fragments > 0, "the response was not fragmented");
    assert_eq!(events.len(), 20);
}

/// A watch from a negative revision (etcd's robustness traffic opens them: a revision offset
/// below the current one) is refused as etcd 3.6 refuses it: one response, created and cancelled
/// with watch ID -1 and etcd's "compacted" reason, before any compaction and after one. Found by
/// etcd's robustness suite: Keel took it for 0 and sent the events after the current revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_negative_revision_answers_as_etcd_3_6() {
    let Some(e) = etcd("3.6") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut answers = Vec::new();
    for (name, bin) in [("etcd", e.server.clone()), ("keel", keel_bin())] {
        let mut p = start(&bin, &tmp.path().join(name), free_port(), free_port(), &[]);
        assert!(p.wait_ready(), "{}", p.log_text());
        let ch = Channel::from_shared(p.endpoint()).unwrap().connect().await.unwrap();
        let mut kv = keel_proto::etcdserverpb::kv_client::KvClient::new(ch.clone());
        let mut got = Vec::new();
        for round in 0..2 {
            for i in 0..3 {
                kv.put(PutRequest { key: format!("n/{i}").into(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
            }
            if round == 1 {
                kv.compact(CompactionRequest { revision: 3, physical: true }).await.unwrap();
            }
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(create("n/", "n0", -2, false)).await.unwrap();
            let mut s = WatchClient::new(ch.clone()).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
            let r = tokio::time::timeout(Duration::from_secs(10), s.message())
                .await
                .unwrap_or_else(|_| panic!("{name} round {round}: no answer"))
                .unwrap()
                .unwrap();
            let rev = r.header.as_ref().map(|h| h.revision).unwrap_or(0);
            got.push((r.created, r.canceled, r.watch_id, r.cancel_reason, r.compact_revision, r.events.len(), rev));
            // Nothing follows on that stream.
            let next = tokio::time::timeout(Duration::from_millis(300), s.message()).await;
            assert!(next.is_err(), "{name} round {round}: more after the refusal: {next:?}");
        }
        answers.push(got);
        p.stop();
    }
    assert_eq!(answers[1], answers[0], "keel (right) vs etcd (left)");
}

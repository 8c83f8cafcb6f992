//! Crash safety: a SIGKILL while clients write loses no acknowledged write.

mod common;

use common::*;
use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crash.etcd");
    let (cp, pp) = (free_port(), free_port());
    let mut p = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(p.wait_ready(), "{}", p.log_text());

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let reached_tx = Arc::new(Mutex::new(Some(reached_tx)));
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut kv = p.kv().await;
        let acked = acked.clone();
        let count = count.clone();
        let reached_tx = reached_tx.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..100_000u32 {
                let key = format!("crash/{w}/{i:06}");
                let value = format!("v-{w}-{i}");
                let r = kv.put(PutRequest { key: key.clone().into(), value: value.clone().into(), ..Default::default() }).await;
                if r.is_err() {
                    return;
                }
                acked.lock().push((key, value));
                if count.fetch_add(1, Ordering::SeqCst) + 1 == 2000 {
                    if let Some(tx) = reached_tx.lock().take() {
                        let _ = tx.send(());
                    }
                }
            }
        }));
    }
    // Kill while the writers are still writing.
    reached_rx.await.unwrap();
    p.sigkill();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().clone();
    assert!(acked.len() >= 2000);

    let mut p2 = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(p2.wait_ready(), "{}", p2.log_text());
    let mut kv = p2.kv().await;
    let resp =
        kv.range(RangeRequest { key: b"crash/".to_vec(), range_end: b"crash0".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    let got: std::collections::HashMap<Vec<u8>, Vec<u8>> = resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    for (k, v) in &acked {
        assert_eq!(got.get(k.as_bytes()).map(|v| v.as_slice()), Some(v.as_bytes()), "acknowledged write {k} lost after SIGKILL");
    }
    // Revisions never go back: every acknowledged put has its own revision.
    let rev = resp.header.unwrap().revision;
    assert!(rev > acked.len() as i64, "revision {rev} after {} acknowledged puts", acked.len());
}

/// Regression (found by `keel-chaos crash-loop`): a restarted member served clients before it
/// had replayed its log, so the first serializable read (or Status) after a SIGKILL could show a
/// revision older than writes it had acknowledged. As etcd, clients are served once the member is
/// ready; the very first answer is never behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_answer_after_a_crash_is_not_behind_acknowledged_writes() {
    use keel_proto::etcdserverpb::kv_client::KvClient;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replay.etcd");
    let (cp, pp) = (free_port(), free_port());
    let mut p = start(&keel_bin(), &dir, cp, pp, &[]);
    assert!(p.wait_ready(), "{}", p.log_text());
    for round in 0..5 {
        // A burst of writes, then a kill before the backend's batch is committed.
        let mut kv = p.kv().await;
        let mut last = 0;
        for i in 0..300 {
            let r = kv.put(PutRequest { key: format!("r{round}/{i}").into(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
            last = r.into_inner().header.unwrap().revision;
        }
        p.sigkill();
        p = start(&keel_bin(), &dir, cp, pp, &[]);
        // Ask as soon as the port answers, without waiting for the ready line.
        let url = format!("http://127.0.0.1:{cp}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let rev = loop {
            assert!(std::time::Instant::now() < deadline, "no answer after restart:\n{}", p.log_text());
            let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await else {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                continue;
            };
            let req = RangeRequest { key: b"r".to_vec(), serializable: true, count_only: true, ..Default::default() };
            match KvClient::new(ch).range(req).await {
                Ok(r) => break r.into_inner().header.unwrap().revision,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            }
        };
        assert!(rev >= last, "round {round}: first answer after restart at revision {rev}, but revision {last} was acknowledged");
    }
}

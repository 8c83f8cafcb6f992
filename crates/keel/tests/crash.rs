//! Crash safety: a SIGKILL while clients write loses no acknowledged write.

mod common;

use common::*;
use keel_proto::etcdserverpb::{PutRequest, RangeRequest};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
                acked.lock().unwrap().push((key, value));
                if count.fetch_add(1, Ordering::SeqCst) + 1 == 2000 {
                    if let Some(tx) = reached_tx.lock().unwrap().take() {
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
    let acked = acked.lock().unwrap().clone();
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

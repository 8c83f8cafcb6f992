//! etcd 3.7's `KV.RangeStream` and keys-only ranges, against real etcd 3.7.3 as the oracle: the
//! same history on a single member of each (puts of small and 64 KiB values, overwrites,
//! deletes, keys on a lease, a compaction), then the same requests to both. Compared: every
//! stream's merged answer (key-values concatenated, header, `more` and `count` from the last
//! chunk) and where the header, `more` and `count` sit (the last chunk only); the unary Range's
//! answer to the same request; and errors (code and message). Headers are compared without the
//! member and cluster IDs and the raft term, which differ between two processes by design.
//!
//! Also, on Keel alone: a stream's merge equals the unary Range (limits, revisions, keys-only,
//! count-only), and a big range arrives in several chunks, none over the chunk size etcd aims at.
//!
//! Needs etcd 3.7.3 (`scripts/etcd-ref.sh v3.7.3`); skipped only when `KEEL_SKIP_ETCD_ORACLE=1`.

mod common;

use common::*;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::*;
use tonic::transport::Channel;

/// A stream's chunks, or the error that ended it (with the chunks before it).
struct Streamed {
    chunks: Vec<RangeResponse>,
    error: Option<(i32, String)>,
}

async fn stream(c: &mut KvClient<Channel>, r: &RangeRequest) -> Streamed {
    let mut chunks = Vec::new();
    let mut s = match c.range_stream(r.clone()).await {
        Ok(s) => s.into_inner(),
        Err(e) => return Streamed { chunks, error: Some((e.code() as i32, e.message().to_string())) },
    };
    loop {
        match s.message().await {
            Ok(Some(m)) => chunks.push(m.range_response.unwrap_or_default()),
            Ok(None) => return Streamed { chunks, error: None },
            Err(e) => return Streamed { chunks, error: Some((e.code() as i32, e.message().to_string())) },
        }
    }
}

fn blank(mut r: RangeResponse) -> RangeResponse {
    if let Some(h) = r.header.as_mut() {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
    r
}

impl Streamed {
    /// The merge of the chunks (etcd's proto.Merge of them), or the error.
    fn merged(&self) -> Result<RangeResponse, (i32, String)> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut out = RangeResponse::default();
        for c in &self.chunks {
            out.kvs.extend(c.kvs.iter().cloned());
            if c.header.is_some() {
                out.header = c.header;
            }
            out.more |= c.more;
            if c.count != 0 {
                out.count = c.count;
            }
        }
        Ok(blank(out))
    }

    /// Only the last chunk carries the header, `more` and `count`.
    fn shape_ok(&self) -> bool {
        let n = self.chunks.len();
        self.error.is_some()
            || (n > 0
                && self.chunks[..n - 1].iter().all(|c| c.header.is_none() && !c.more && c.count == 0)
                && self.chunks[n - 1].header.is_some())
    }
}

async fn unary(c: &mut KvClient<Channel>, r: &RangeRequest) -> Result<RangeResponse, (i32, String)> {
    c.range(r.clone()).await.map(|r| blank(r.into_inner())).map_err(|e| (e.code() as i32, e.message().to_string()))
}

fn key(i: usize) -> Vec<u8> {
    format!("k/{i:04}").into_bytes()
}

/// The same history on either server; returns the revision before the last writes.
async fn load(ch: &Channel) -> i64 {
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    lease.lease_grant(LeaseGrantRequest { ttl: 600, id: 0x7e57 }).await.unwrap();
    for i in 0..300 {
        // Every seventh value is 64 KiB: chunks reach the size etcd aims at (1.5 MiB).
        // Values are distinct: etcd sorts by value with Go's unstable sort, which orders ties its
        // own way once there are more than 12 of them.
        let value =
            if i % 7 == 0 { [format!("{i:04}").into_bytes(), vec![b'v'; 64 << 10]].concat() } else { format!("value {i}").into_bytes() };
        let lease = if i % 5 == 0 { 0x7e57 } else { 0 };
        kv.put(PutRequest { key: key(i), value, lease, ..Default::default() }).await.unwrap();
    }
    for i in (0..300).step_by(3) {
        kv.put(PutRequest { key: key(i), value: format!("again {i}").into_bytes(), ..Default::default() }).await.unwrap();
    }
    let mid = kv.range(RangeRequest { key: b"k".to_vec(), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    kv.delete_range(DeleteRangeRequest { key: key(10), range_end: key(20), ..Default::default() }).await.unwrap();
    for i in 10..13 {
        kv.put(PutRequest { key: key(i), value: format!("reborn {i}").into_bytes(), ..Default::default() }).await.unwrap();
    }
    kv.compact(CompactionRequest { revision: mid - 100, physical: true }).await.unwrap();
    mid
}

fn requests(mid: i64) -> Vec<(&'static str, RangeRequest)> {
    let all = RangeRequest { key: b"k/".to_vec(), range_end: b"k0".to_vec(), ..Default::default() };
    vec![
        ("everything", all.clone()),
        ("serializable", RangeRequest { serializable: true, ..all.clone() }),
        ("one key", RangeRequest { key: key(42), ..Default::default() }),
        ("missing key", RangeRequest { key: b"nope".to_vec(), ..Default::default() }),
        ("from key", RangeRequest { key: key(250), range_end: vec![0], ..Default::default() }),
        ("limit 7", RangeRequest { limit: 7, ..all.clone() }),
        ("limit 150", RangeRequest { limit: 150, ..all.clone() }),
        ("limit past the end", RangeRequest { limit: 1000, ..all.clone() }),
        ("keys only", RangeRequest { keys_only: true, ..all.clone() }),
        ("keys only, limit", RangeRequest { keys_only: true, limit: 33, ..all.clone() }),
        ("count only", RangeRequest { count_only: true, ..all.clone() }),
        ("at a revision", RangeRequest { revision: mid, ..all.clone() }),
        ("keys only at a revision", RangeRequest { revision: mid - 50, keys_only: true, ..all.clone() }),
        ("ascending by key", RangeRequest { sort_order: SortOrder::Ascend as i32, ..all.clone() }),
        ("descending", RangeRequest { sort_order: SortOrder::Descend as i32, ..all.clone() }),
        ("by value", RangeRequest { sort_order: SortOrder::Ascend as i32, sort_target: SortTarget::Value as i32, ..all.clone() }),
        ("filtered", RangeRequest { min_mod_revision: 5, ..all.clone() }),
        ("empty key", RangeRequest::default()),
        ("future revision", RangeRequest { revision: 1_000_000, ..all.clone() }),
        ("compacted revision", RangeRequest { revision: 3, ..all.clone() }),
        ("bad sort", RangeRequest { sort_order: 9, ..all.clone() }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_stream_and_keys_only_answer_as_etcd_3_7() {
    let Some(e) = etcd("v3.7.3") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut ep = start(&e.server, &tmp.path().join("etcd.etcd"), free_port(), free_port(), &[]);
    let mut kp = start(&keel_bin(), &tmp.path().join("keel.etcd"), free_port(), free_port(), &[]);
    assert!(ep.wait_ready(), "etcd did not start: {}", ep.log_text());
    assert!(kp.wait_ready(), "keel did not start: {}", kp.log_text());
    let (ech, kch) = (channel(&ep.endpoint()), channel(&kp.endpoint()));
    let (mid, kmid) = (load(&ech).await, load(&kch).await);
    assert_eq!(mid, kmid, "the same history makes the same revisions");
    let (mut ec, mut kc) = (KvClient::new(ech), KvClient::new(kch));
    let mut diffs = Vec::new();
    for (name, r) in requests(mid) {
        let (want, got) = (stream(&mut ec, &r).await, stream(&mut kc, &r).await);
        assert!(want.shape_ok(), "{name}: etcd's chunks are not shaped as expected");
        assert!(got.shape_ok(), "{name}: only the last chunk may carry header, more and count ({} chunks)", got.chunks.len());
        if want.merged() != got.merged() {
            diffs.push(format!("{name} (stream):\n  etcd: {:?}\n  keel: {:?}", summary(&want.merged()), summary(&got.merged())));
        }
        let (want, got) = (unary(&mut ec, &r).await, unary(&mut kc, &r).await);
        if want != got {
            diffs.push(format!("{name} (range):\n  etcd: {:?}\n  keel: {:?}", summary(&want), summary(&got)));
        }
    }
    assert!(diffs.is_empty(), "{} answers differ from etcd 3.7.3:\n{}", diffs.len(), diffs.join("\n"));
}

/// A short description of an answer for a failure message (values can be 64 KiB).
fn summary(r: &Result<RangeResponse, (i32, String)>) -> String {
    match r {
        Err(e) => format!("error {e:?}"),
        Ok(r) => {
            let kvs: Vec<String> = r
                .kvs
                .iter()
                .map(|kv| {
                    format!(
                        "{}@{}/{}/v{} lease {:x} {}B",
                        String::from_utf8_lossy(&kv.key),
                        kv.create_revision,
                        kv.mod_revision,
                        kv.version,
                        kv.lease,
                        kv.value.len()
                    )
                })
                .collect();
            format!("header {:?} more {} count {} kvs {:?}", r.header, r.more, r.count, kvs)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_merges_to_the_range_answer_in_bounded_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut kp = start(&keel_bin(), &tmp.path().join("keel.etcd"), free_port(), free_port(), &[]);
    assert!(kp.wait_ready(), "keel did not start: {}", kp.log_text());
    let ch = channel(&kp.endpoint());
    let mid = load(&ch).await;
    let mut kc = KvClient::new(ch);
    for (name, r) in requests(mid) {
        let got = stream(&mut kc, &r).await;
        assert!(got.shape_ok(), "{name}: only the last chunk may carry header, more and count");
        let unary = unary(&mut kc, &r).await;
        let custom_order =
            r.sort_order == SortOrder::Descend as i32 || r.sort_target == SortTarget::Value as i32 || r.min_mod_revision != 0;
        if custom_order && unary.is_ok() {
            assert_eq!(got.error.as_ref().map(|e| e.0), Some(tonic::Code::Unimplemented as i32), "{name}");
            continue;
        }
        assert_eq!(summary(&got.merged()), summary(&unary), "{name}: the stream's merge is the Range answer");
        assert_eq!(got.merged(), unary, "{name}: the stream's merge is the Range answer (values)");
    }
    // ~43 values of 64 KiB: more than one chunk, each near or under etcd's target (1.5 MiB,
    // twice that at most before the next page halves).
    let all = stream(&mut kc, &RangeRequest { key: b"k/".to_vec(), range_end: b"k0".to_vec(), ..Default::default() }).await;
    assert!(all.chunks.len() >= 3, "a 2.8 MB range came in {} chunks", all.chunks.len());
    for c in &all.chunks {
        let size = prost::Message::encoded_len(c);
        assert!(size <= 4 * 1_572_864, "a chunk of {size} bytes");
    }
}

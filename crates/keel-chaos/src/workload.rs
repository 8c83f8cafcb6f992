//! The clients: each sends one request at a time (put, linearizable get, delete, txn with a
//! compare, put with a lease and lease revoke) to one member, moving to another on an error, and
//! records every operation with its invocation and completion time and its outcome. Watchers
//! watch the whole key prefix with prev_kv from revision 1, resume where they left off on
//! another member after an error, ask for progress notifications, and record every response.

use crate::cluster::channel;
use crate::history::{Cmp, Event, Input, Kv, Op, Output, Time, WatchResponse, WatchStart, NEVER};
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::request_op::Request as OpReq;
use keel_proto::etcdserverpb::response_op::Response as OpResp;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest,
};
use keel_proto::mvccpb;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PREFIX: &str = "/chaos/";
/// How long a request may take before its outcome counts as unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Shared by clients, watchers and the fault scheduler.
pub struct Shared {
    pub start: Instant,
    pub base: u16,
    /// Members clients may talk to (the current membership).
    pub members: Mutex<Vec<usize>>,
    /// Members that run etcd (a mixed cluster).
    pub etcd: Mutex<Vec<usize>>,
    pub stop: AtomicBool,
    pub ops: Mutex<Vec<Op>>,
    pub watch: Mutex<Vec<WatchResponse>>,
    pub watch_starts: Mutex<Vec<WatchStart>>,
    /// Highest revision each watcher has received an event for (compaction stays below all).
    pub watcher_revs: Mutex<Vec<i64>>,
    pub max_rev: AtomicI64,
}

impl Shared {
    pub fn now(&self) -> Time {
        self.start.elapsed().as_nanos() as Time
    }

    fn pick_member(&self, rng: &mut StdRng, not: Option<usize>) -> usize {
        let ms = self.members.lock().clone();
        let choices: Vec<usize> = ms.iter().copied().filter(|m| Some(*m) != not).collect();
        let from = if choices.is_empty() { &ms } else { &choices };
        *from.choose(rng).expect("a cluster always has members")
    }

    fn record(&self, op: Op) {
        if let Some(r) = op.header_rev() {
            self.max_rev.fetch_max(r, Ordering::Relaxed);
        }
        self.ops.lock().push(op);
    }

    pub fn next_op_id(&self) -> usize {
        self.ops.lock().len()
    }
}

fn to_kv(k: &mvccpb::KeyValue) -> Kv {
    Kv {
        value: String::from_utf8_lossy(&k.value).into_owned(),
        mod_rev: k.mod_revision,
        create_rev: k.create_revision,
        version: k.version,
        lease: k.lease,
    }
}

fn rev_of(h: &Option<keel_proto::etcdserverpb::ResponseHeader>) -> i64 {
    h.as_ref().map(|h| h.revision).unwrap_or(0)
}

/// One client's loop. `keys` keys under [`PREFIX`].
pub async fn client(shared: Arc<Shared>, id: usize, keys: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut member = shared.pick_member(&mut rng, None);
    let mut seq = 0u64;
    // Leases this client granted and attached to one key each: (lease, key).
    let mut leases: Vec<(i64, String)> = Vec::new();
    // After a failure the client waits a little: while no member answers (all of them down), a
    // client failing at full speed would fill the history with unknown outcomes.
    let mut failed = false;
    while !shared.stop.load(Ordering::Relaxed) {
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Ok(ch) = channel(member, shared.base) else { break };
        let mut kv = KvClient::new(ch.clone());
        let key = format!("{PREFIX}k{}", rng.gen_range(0..keys));
        seq += 1;
        let value = format!("c{id}-{seq}");
        let dice = rng.gen_range(0..100);
        let call = shared.now();
        // Each arm yields (key, input, Result<output, error text>).
        let (key, input, result): (String, Input, Result<Output, String>) = if dice < 30 {
            let r = tokio::time::timeout(
                OP_TIMEOUT,
                kv.put(PutRequest { key: key.clone().into(), value: value.clone().into(), ..Default::default() }),
            )
            .await;
            (key, Input::Put { value, lease: 0 }, flat(r).map(|r| Output::Put { rev: rev_of(&r.header) }))
        } else if dice < 60 {
            let r = tokio::time::timeout(OP_TIMEOUT, kv.range(RangeRequest { key: key.clone().into(), ..Default::default() })).await;
            (key, Input::Get, flat(r).map(|r| Output::Get { kv: r.kvs.first().map(to_kv), rev: rev_of(&r.header) }))
        } else if dice < 67 {
            let r = tokio::time::timeout(OP_TIMEOUT, kv.delete_range(DeleteRangeRequest { key: key.clone().into(), ..Default::default() }))
                .await;
            (key, Input::Delete, flat(r).map(|r| Output::Delete { deleted: r.deleted, rev: rev_of(&r.header) }))
        } else if dice < 90 {
            // Compare against the value this client last saw for some key (or absence).
            let last_seen = {
                let ops = shared.ops.lock();
                ops.iter().rev().take(200).find_map(|o| match (&o.output, o.key == key) {
                    (Output::Get { kv: Some(k), .. }, true) => Some(k.value.clone()),
                    _ => None,
                })
            };
            let cmp = match last_seen {
                Some(v) if rng.gen_bool(0.8) => Cmp::Value(v),
                _ => Cmp::Absent,
            };
            let compare = match &cmp {
                Cmp::Value(v) => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: key.clone().into(),
                    target_union: Some(TargetUnion::Value(v.clone().into())),
                    ..Default::default()
                },
                Cmp::Absent => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: key.clone().into(),
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                },
            };
            let req = TxnRequest {
                compare: vec![compare],
                success: vec![RequestOp {
                    request: Some(OpReq::RequestPut(PutRequest {
                        key: key.clone().into(),
                        value: value.clone().into(),
                        ..Default::default()
                    })),
                }],
                failure: vec![RequestOp {
                    request: Some(OpReq::RequestRange(RangeRequest { key: key.clone().into(), ..Default::default() })),
                }],
            };
            let r = tokio::time::timeout(OP_TIMEOUT, kv.txn(req)).await;
            let out = flat(r).map(|r| {
                let got = r.responses.first().and_then(|x| match &x.response {
                    Some(OpResp::ResponseRange(rr)) => rr.kvs.first().map(to_kv),
                    _ => None,
                });
                Output::Txn { succeeded: r.succeeded, rev: rev_of(&r.header), kv: if r.succeeded { None } else { got } }
            });
            (key, Input::Txn { cmp, value }, out)
        } else if dice < 96 || leases.is_empty() {
            // A fresh lease (long TTL: it never expires during a run) on one key.
            let mut lc = LeaseClient::new(ch.clone());
            let granted = tokio::time::timeout(OP_TIMEOUT, lc.lease_grant(LeaseGrantRequest { ttl: 3600, id: 0 })).await;
            let Ok(Ok(g)) = granted else {
                member = shared.pick_member(&mut rng, Some(member));
                continue;
            };
            let lease = g.into_inner().id;
            let call = shared.now();
            let r = tokio::time::timeout(
                OP_TIMEOUT,
                kv.put(PutRequest { key: key.clone().into(), value: value.clone().into(), lease, ..Default::default() }),
            )
            .await;
            leases.push((lease, key.clone()));
            let out = flat(r).map(|r| Output::Put { rev: rev_of(&r.header) });
            failed = finish(&shared, id, member, key, Input::Put { value, lease }, out, call, &mut member, &mut rng);
            continue;
        } else {
            let (lease, key) = leases.remove(rng.gen_range(0..leases.len()));
            let mut lc = LeaseClient::new(ch.clone());
            let r = tokio::time::timeout(OP_TIMEOUT, lc.lease_revoke(LeaseRevokeRequest { id: lease })).await;
            (key, Input::Revoke { lease }, flat(r).map(|r| Output::Revoke { rev: rev_of(&r.header) }))
        };
        failed = finish(&shared, id, member, key, input, result, call, &mut member, &mut rng);
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    shared: &Shared,
    client: usize,
    at: usize,
    key: String,
    input: Input,
    result: Result<Output, String>,
    call: Time,
    member: &mut usize,
    rng: &mut StdRng,
) -> bool {
    let (output, ret, error) = match result {
        Ok(o) => (o, shared.now(), None),
        // Refused by Keel's quota (checked before proposing, or by the capped applier): certainly
        // not applied, so it is no operation at all. etcd's apply also answers a write it
        // applied with this error when its own backend is over the quota (its quota applier):
        // from an etcd member the outcome is unknown.
        Err(e) if e.contains("database space exceeded") && !shared.etcd.lock().contains(&at) => return false,
        // Never sent: no connection to the member could be made.
        Err(e) if e.contains("tcp connect error") => {
            *member = shared.pick_member(rng, Some(at));
            return true;
        }
        // A read whose answer never came changes nothing and constrains nothing.
        Err(_) if matches!(input, Input::Get) => {
            *member = shared.pick_member(rng, Some(at));
            return true;
        }
        Err(e) => {
            *member = shared.pick_member(rng, Some(at));
            (Output::Unknown, NEVER, Some(e))
        }
    };
    let failed = error.is_some();
    let id = shared.next_op_id();
    shared.record(Op { id, client, member: at, key, input, output, call, ret, error });
    failed
}

fn flat<T>(r: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>) -> Result<T, String> {
    match r {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err("timed out".into()),
    }
}

/// One watcher's loop over streams.
pub async fn watcher(shared: Arc<Shared>, id: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut member = shared.pick_member(&mut rng, None);
    let mut next_rev = 1i64;
    let mut stream_no = 0usize;
    let end = {
        let mut e = PREFIX.as_bytes().to_vec();
        if let Some(l) = e.last_mut() {
            *l += 1;
        }
        e
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) && next_rev > shared.max_rev.load(Ordering::Relaxed) {
            return;
        }
        stream_no += 1;
        let Ok(ch) = channel(member, shared.base) else { return };
        let mut wc = WatchClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel::<WatchRequest>(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: PREFIX.as_bytes().to_vec(),
                range_end: end.clone(),
                start_revision: next_rev,
                progress_notify: true,
                prev_kv: true,
                ..Default::default()
            })),
        };
        if tx.send(create).await.is_err() {
            return;
        }
        let started = tokio::time::timeout(Duration::from_secs(3), wc.watch(tokio_stream::wrappers::ReceiverStream::new(rx))).await;
        let mut s = match started {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                member = shared.pick_member(&mut rng, Some(member));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut compacted = false;
        let mut created = false;
        let mut ticker = tokio::time::interval(Duration::from_millis(300));
        loop {
            let msg = tokio::select! {
                m = tokio::time::timeout(Duration::from_secs(3), s.message()) => m,
                _ = ticker.tick() => {
                    if created {
                        let _ = tx.try_send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) });
                    }
                    if shared.stop.load(Ordering::Relaxed) && next_rev > shared.max_rev.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                }
            };
            let r = match msg {
                Ok(Ok(Some(r))) => r,
                _ => break,
            };
            let record_start = |compacted: bool| {
                let start = WatchStart { watcher: id, member, stream: stream_no, start_rev: next_rev, compacted };
                shared.watch_starts.lock().push(start);
            };
            if r.created {
                created = true;
                record_start(false);
                if !r.canceled {
                    continue;
                }
            }
            if r.canceled {
                if r.compact_revision > 0 {
                    compacted = true;
                    record_start(true);
                }
                break;
            }
            let events: Vec<Event> = r
                .events
                .iter()
                .map(|e| {
                    let kv = e.kv.clone().unwrap_or_default();
                    let delete = e.r#type == mvccpb::event::EventType::Delete as i32;
                    Event {
                        key: String::from_utf8_lossy(&kv.key).into_owned(),
                        mod_rev: kv.mod_revision,
                        kv: if delete { None } else { Some(to_kv(&kv)) },
                        prev: e.prev_kv.as_ref().map(to_kv),
                    }
                })
                .collect();
            let header_rev = rev_of(&r.header);
            if let Some(last) = events.last() {
                next_rev = last.mod_rev + 1;
                let mut revs = shared.watcher_revs.lock();
                if let Some(slot) = revs.get_mut(id) {
                    *slot = last.mod_rev;
                }
            }
            let progress = events.is_empty();
            if progress {
                // Everything up to here was delivered: resume after it, and compaction may go
                // up to it.
                next_rev = next_rev.max(header_rev + 1);
                let mut revs = shared.watcher_revs.lock();
                if let Some(slot) = revs.get_mut(id) {
                    *slot = (*slot).max(header_rev);
                }
            }
            shared.watch.lock().push(WatchResponse {
                watcher: id,
                member,
                stream: stream_no,
                header_rev,
                events,
                progress,
                at: shared.now(),
            });
            if progress && shared.stop.load(Ordering::Relaxed) && header_rev >= shared.max_rev.load(Ordering::Relaxed) {
                return;
            }
        }
        if compacted {
            return;
        }
        member = shared.pick_member(&mut rng, Some(member));
    }
}

//! The state machine raft drives: applies committed entries to the MVCC store and the member
//! list, then wakes the caller waiting for that entry.
//!
//! Owns nothing but references: the store and members are shared with the read path.
//! Called by keel-raft's node thread only.

use crate::membership::{Members, AUX_MEMBERS};
use keel_mvcc::kv::{self, NoLeases};
use keel_mvcc::{KvError, Store};
use keel_proto::etcdserverpb::{CompactionResponse, DeleteRangeResponse, PutResponse, TxnResponse};
use keel_proto::keelpb::{internal_request::Request, InternalRequest};
use keel_raft::eraftpb::{ConfState, Entry};
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::oneshot;

/// The outcome of applying one request.
#[derive(Debug)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    MemberAttributes,
}

/// The store's revision after the request, with what it produced.
pub type ApplyResult = Result<(Applied, i64), KvError>;

/// Callers waiting for their proposals to be applied, by request id.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<u64, oneshot::Sender<ApplyResult>>>,
}

impl Waiters {
    pub fn register(&self, id: u64) -> oneshot::Receiver<ApplyResult> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        rx
    }

    pub fn cancel(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn trigger(&self, id: u64, r: ApplyResult) {
        if let Some(tx) = self.lock().remove(&id) {
            let _ = tx.send(r);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<ApplyResult>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Applier {
    pub store: Arc<RwLock<Store>>,
    pub members: Arc<RwLock<Members>>,
    pub waiters: Arc<Waiters>,
}

/// A backend failure leaves the member unable to keep its promises: stop the process, as etcd does.
fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    tracing::error!(error = %e, "{what}; stopping");
    std::process::exit(1);
}

impl Applier {
    fn store_mut(&self) -> std::sync::RwLockWriteGuard<'_, Store> {
        self.store.write().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_request(&self, store: &mut Store, req: Request) -> ApplyResult {
        match req {
            Request::Put(p) => {
                let mut w = store.write();
                let r = kv::put(&mut w, &p, &NoLeases);
                let (rev, _events) = w.end();
                r.map(|resp| (Applied::Put(resp), rev))
            }
            Request::DeleteRange(d) => {
                let mut w = store.write();
                let r = kv::delete_range(&mut w, &d);
                let (rev, _events) = w.end();
                r.map(|resp| (Applied::DeleteRange(resp), rev))
            }
            Request::Txn(t) => {
                let mut w = store.write();
                let r = kv::txn(&mut w, &t, &NoLeases);
                let (rev, _events) = w.end();
                r.map(|resp| (Applied::Txn(resp), rev))
            }
            Request::Compaction(c) => {
                store.compact(c.revision)?;
                if c.physical {
                    // Physical compaction is done once the deletions are durable in the backend.
                    if let Err(e) = store.commit() {
                        fatal("backend commit failed", e);
                    }
                }
                Ok((
                    Applied::Compaction(CompactionResponse { header: None }),
                    store.current_rev(),
                ))
            }
            Request::MemberAttributes(a) => {
                let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
                if let Some(m) = members.get_mut(a.id) {
                    m.name = a.name;
                    m.client_urls = a.client_urls;
                }
                store.set_aux(AUX_MEMBERS, members.encode());
                Ok((Applied::MemberAttributes, store.current_rev()))
            }
        }
    }
}

impl keel_raft::StateMachine for Applier {
    fn applied_index(&self) -> u64 {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .consistent_index()
    }

    fn applied_term(&self) -> u64 {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .consistent_term()
    }

    fn apply(&mut self, entry: &Entry) {
        let mut store = self.store_mut();
        if entry.index <= store.consistent_index() {
            // Already in the backend: a replay after restart.
            return;
        }
        let mut outcome = None;
        if !entry.get_data().is_empty() {
            match InternalRequest::decode(entry.get_data()) {
                Ok(InternalRequest {
                    id,
                    request: Some(req),
                }) => outcome = Some((id, self.apply_request(&mut store, req))),
                Ok(_) => tracing::warn!(index = entry.index, "apply: empty request"),
                Err(e) => {
                    tracing::error!(index = entry.index, error = %e, "apply: undecodable entry skipped")
                }
            }
        }
        store.set_consistent_index(entry.index, entry.term);
        drop(store);
        if let Some((id, r)) = outcome {
            if id != 0 {
                self.waiters.trigger(id, r);
            }
        }
    }

    fn apply_conf_change(&mut self, entry: &Entry, _cs: &ConfState) {
        let mut store = self.store_mut();
        if entry.index > store.consistent_index() {
            store.set_consistent_index(entry.index, entry.term);
        }
    }

    fn maintain(&mut self) {
        let due = self
            .store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .commit_due();
        if due {
            if let Err(e) = self.store_mut().commit() {
                fatal("backend commit failed", e);
            }
        }
    }

    fn sync(&mut self) -> Result<(), String> {
        self.store_mut().commit().map_err(|e| e.to_string())
    }

    fn snapshot_data(&self) -> Vec<u8> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .encode()
    }
}

//! The store as a member shares it: one writer (the apply stage), many readers (gRPC handlers,
//! watch catch-up, snapshot senders), and backend commits that do not hold the lock.
//!
//! Owns the lock around [`Store`] and the commit lock. Lock order: the commit lock, then the
//! store lock. What each path holds:
//! - a write (apply) holds the store's write lock for one entry;
//! - a commit ([`SharedStore::commit`]) holds the commit lock throughout, and the store's write
//!   lock only to take the batch out and to hand it back: the redb transaction and its fsync run
//!   with the store free, readers finding the batch's values in the batch meanwhile;
//! - a read that touches many keys ([`SharedStore::range`], [`SharedStore::hash_kv`],
//!   [`SharedStore::events_between`]) holds the read lock for an index walk, then reads values
//!   through a redb read transaction opened under it, with the lock released.
//!
//! Calls only [`Store`].

use crate::backend::{BackendError, CommitMode};
use crate::kv::{self, KvError};
use crate::store::{Fetch, Store};
use keel_proto::etcdserverpb::{RangeRequest, RangeResponse};
use keel_proto::mvccpb::Event;
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub struct SharedStore {
    store: RwLock<Store>,
    commit: Mutex<()>,
}

/// Exclusive use of the store (no commit running, no reader, no writer): defragmentation's swap,
/// installing a snapshot.
pub struct Exclusive<'a> {
    _commit: MutexGuard<'a, ()>,
    pub store: RwLockWriteGuard<'a, Store>,
}

impl SharedStore {
    pub fn new(store: Store) -> SharedStore {
        SharedStore { store: RwLock::new(store), commit: Mutex::new(()) }
    }

    /// The store for reading; hold it briefly (plan a big read, load it after).
    pub fn read(&self) -> RwLockReadGuard<'_, Store> {
        self.store.read()
    }

    /// The store for writing: the apply stage, one entry at a time.
    pub fn write(&self) -> RwLockWriteGuard<'_, Store> {
        self.store.write()
    }

    /// The store with no commit in progress and nobody else in it.
    pub fn exclusive(&self) -> Exclusive<'_> {
        let c = self.commit.lock();
        Exclusive { _commit: c, store: self.store.write() }
    }

    /// Makes everything applied so far durable in the backend. The store stays readable and
    /// writable while the batch is written; concurrent commits wait for each other.
    pub fn commit(&self) -> Result<(), BackendError> {
        self.commit_at_least(CommitMode::Durable)
    }

    /// Commits the pending batch, durably if `at_least` says so or one is owed
    /// ([`Store::take_batch`]).
    fn commit_at_least(&self, at_least: CommitMode) -> Result<(), BackendError> {
        let _c = self.commit.lock();
        let Some((batch, backend)) = self.store.write().take_batch(at_least) else { return Ok(()) };
        match batch.write_to(&backend) {
            Ok(()) => {
                self.store.write().finish_batch(&batch);
                Ok(())
            }
            Err(e) => {
                self.store.write().abort_batch(batch);
                Err(e)
            }
        }
    }

    /// The backend with everything applied so far committed to it (for a hash, a copy or a
    /// snapshot: a read transaction on it sees the whole applied state).
    pub fn committed_backend(&self) -> Result<crate::backend::Backend, BackendError> {
        self.commit()?;
        Ok(self.store.read().backend())
    }

    /// Commits when the batch is due (old or big enough); returns whether it committed.
    pub fn commit_if_due(&self) -> Result<bool, BackendError> {
        if !self.store.read().commit_due() {
            return Ok(false);
        }
        self.commit_at_least(CommitMode::Visible).map(|()| true)
    }

    /// etcd's Range on the current state: planned under the read lock, values loaded after.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, KvError> {
        self.plan_range(req)?.finish()
    }

    /// Plans a Range under the read lock; [`PlannedRange::finish`] reads it without the lock.
    pub fn plan_range(&self, req: &RangeRequest) -> Result<PlannedRange, KvError> {
        let s = self.store.read();
        let cur = s.current_rev();
        let at = s.check_rev(req.revision, cur)?;
        let (plan, count) = s.plan_range(&req.key, &req.range_end, at, kv::fetch_limit(req), Fetch::of(req))?;
        Ok(PlannedRange { plan, count, cur, shape: ShapeOf::from(req) })
    }

    /// Plans one page of a streamed Range under the read lock: up to `limit` key-values of
    /// `[key, end)` at revision `rev` (0: the current one), as `fetch` says;
    /// [`PlannedPage::finish`] reads them without the lock. A revision compacted meanwhile is
    /// refused (as etcd refuses a stream's next chunk then).
    pub fn plan_page(&self, key: &[u8], end: &[u8], rev: i64, limit: usize, fetch: Fetch) -> Result<PlannedPage, KvError> {
        let s = self.store.read();
        let cur = s.current_rev();
        let at = s.check_rev(rev, cur)?;
        let (plan, more) = s.plan_page(key, end, at, limit, fetch)?;
        Ok(PlannedPage { plan, more, at, cur })
    }

    /// The number of keys in `[key, end)` at revision `at`, from the index.
    pub fn count_at(&self, key: &[u8], end: &[u8], at: i64) -> Result<i64, KvError> {
        let s = self.store.read();
        let at = s.check_rev(at, s.current_rev())?;
        s.count_at(key, end, at)
    }

    /// Plans a read-only transaction under the read lock (compares, index walks);
    /// [`kv::TxnReadPlan::finish`] reads its values without the lock.
    pub fn plan_txn_read(&self, req: &keel_proto::etcdserverpb::TxnRequest) -> Result<kv::TxnReadPlan, KvError> {
        kv::plan_txn_read(&self.store.read(), req)
    }

    /// etcd's HashKV at `rev` (0: current): (hash, current revision, compacted revision).
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), KvError> {
        let plan = self.store.read().plan_hash_kv(rev)?;
        plan.run()
    }

    /// [`Store::events_between`], reading values without the lock.
    pub fn events_between(&self, key: &[u8], end: &[u8], from: i64, to: i64, with_prev: bool) -> Result<Vec<Event>, KvError> {
        let plan = self.store.read().plan_events(key, end, from, to, with_prev)?;
        plan.load()
    }
}

/// One page of a streamed Range planned under the store's lock (see [`SharedStore::plan_page`]).
pub struct PlannedPage {
    plan: crate::store::ReadPlan,
    more: bool,
    at: i64,
    cur: i64,
}

impl PlannedPage {
    /// Key-values it will read.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.len() == 0
    }

    /// Whether keys in range follow this page's last.
    pub fn more(&self) -> bool {
        self.more
    }

    /// The revision read at.
    pub fn at(&self) -> i64 {
        self.at
    }

    /// The store's revision when the page was planned.
    pub fn current(&self) -> i64 {
        self.cur
    }

    /// Reads the key-values, in key order.
    pub fn finish(self) -> Result<Vec<keel_proto::mvccpb::KeyValue>, KvError> {
        self.plan.load()
    }
}

/// The parts of a RangeRequest its answer is shaped by (the keys themselves are planned).
struct ShapeOf(RangeRequest);

impl From<&RangeRequest> for ShapeOf {
    fn from(r: &RangeRequest) -> ShapeOf {
        ShapeOf(RangeRequest { key: Vec::new(), range_end: Vec::new(), ..r.clone() })
    }
}

/// A Range planned under the store's lock: the values are read by [`PlannedRange::finish`],
/// which needs no lock and may run on another thread.
pub struct PlannedRange {
    plan: crate::store::ReadPlan,
    count: i64,
    cur: i64,
    shape: ShapeOf,
}

impl PlannedRange {
    /// Key-values it will read.
    pub fn len(&self) -> usize {
        self.plan.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plan.len() == 0
    }

    /// Reads the values and shapes etcd's answer.
    pub fn finish(self) -> Result<RangeResponse, KvError> {
        Ok(kv::shape_range(&self.shape.0, self.plan.load()?, self.count, self.cur))
    }
}

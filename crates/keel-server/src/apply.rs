//! The state machine raft drives: applies committed entries to the MVCC store and the member
//! list, then wakes the caller waiting for that entry.
//!
//! Owns nothing but references: the store and members are shared with the read path.
//! Called by keel-raft's apply stage only (its own thread, apart from the raft thread).

use crate::alarm::Alarms;

use crate::error::Error;
use crate::membership::{MemberJson, Members, AUX_CLUSTER_VERSION, AUX_MEMBERS};
use keel_auth::{AuthError, AuthInfo, AuthStore, Perm, Tokens};
use keel_lease::{self as lease, Lessor};
use keel_mvcc::kv::{self, Leases};
use keel_mvcc::{SharedStore, Store, TxnOutcome};
use keel_proto::etcdserverpb::AlarmType;
use keel_proto::etcdserverpb::TxnRequest;
use keel_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantResponse, LeaseRevokeResponse, PutResponse, TxnResponse,
};
use keel_proto::keelpb::{internal_raft_request::Request, ConfChangeContext, MemberAttributes, MemberRecord};
use keel_raft::eraftpb::{ConfState, Entry, Snapshot};
use keel_raft::wire::{ChangeKind, MemberChange};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::oneshot;

/// The outcome of applying one request.
#[derive(Debug)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    MemberAttributes,
    /// A request that changes nothing here (reads etcd proposes, cluster version and downgrade
    /// records Keel does not keep yet).
    Nothing,
    /// A membership change: the member list after it.
    Members(Vec<keel_proto::etcdserverpb::Member>),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseCheckpoint,
    /// An auth store change (its response carries only a header).
    Auth,
    /// The alarms an alarm request reports or changed.
    Alarm(Vec<keel_proto::etcdserverpb::AlarmMember>),
}

/// The store's revision after the request, with what it produced; or etcd's error.
pub type ApplyResult = Result<(Applied, i64), Error>;

/// The lessor as the KV rules see it.
pub struct LeaseView<'a>(pub &'a Lessor);

impl Leases for LeaseView<'_> {
    fn exists(&self, id: i64) -> bool {
        self.0.exists(id)
    }
}

/// Rebuilds the lessor from the backend: lease records, then the keys attached to them.
pub fn load_leases(store: &Store, lessor: &mut Lessor) {
    lessor.clear();
    let mut leases = 0usize;
    for (name, v) in store.aux_prefix(lease::AUX_PREFIX) {
        let id = u64::from_str_radix(&name[lease::AUX_PREFIX.len()..], 16).unwrap_or(0) as i64;
        let ttl = v.try_into().map(i64::from_be_bytes).unwrap_or(0);
        if id != 0 {
            lessor.restore(id, ttl);
            leases += 1;
        }
    }
    // With no lease no key is attached to one: no walk of every key (with the index kept in the
    // backend, a read of every key's history).
    if leases == 0 {
        return;
    }
    for (k, id) in store.leased_keys().unwrap_or_else(|e| fatal("cannot read the leased keys from the key index", e)) {
        lessor.moved(&k, 0, id);
    }
}

/// Callers waiting for their proposals to be applied, by request id. A proposal this member
/// put in its log as leader is also known by its place (index and term): when the entry applied
/// at that index is another one, the proposal was lost to a leader change and its caller is told
/// at once instead of at its timeout.
#[derive(Default)]
pub struct Waiters {
    inner: Mutex<WaitersInner>,
}

#[derive(Default)]
struct WaitersInner {
    map: HashMap<u64, oneshot::Sender<ApplyResult>>,
    /// index -> request id of proposals placed in this member's log as leader.
    placed: std::collections::BTreeMap<u64, u64>,
    /// The last entry applied.
    applied: u64,
    /// The node stopped: nobody will be answered any more.
    stopped: bool,
}

impl Waiters {
    pub fn register(&self, id: u64) -> oneshot::Receiver<ApplyResult> {
        let (tx, rx) = oneshot::channel();
        let mut w = self.inner.lock();
        if w.stopped {
            let _ = tx.send(Err(Error::Stopped));
        } else {
            w.map.insert(id, tx);
        }
        rx
    }

    pub fn cancel(&self, id: u64) {
        self.inner.lock().map.remove(&id);
    }

    /// Request `id` went into this member's log (as leader) at `at`.
    pub fn placed(&self, id: u64, at: keel_raft::Proposed) {
        let mut w = self.inner.lock();
        if !w.map.contains_key(&id) {
            return;
        }
        if at.index <= w.applied {
            // Its index is applied already, and it was not this request (else it would have
            // been answered): lost.
            if let Some(tx) = w.map.remove(&id) {
                let _ = tx.send(Err(Error::LeaderChanged));
            }
            return;
        }
        w.placed.insert(at.index, id);
    }

    fn trigger(&self, id: u64, r: ApplyResult) {
        if let Some(tx) = self.inner.lock().map.remove(&id) {
            let _ = tx.send(r);
        }
    }

    /// Entry `index` has been applied (its own request answered already): whatever was placed
    /// at or before it and still waits was overwritten by another leader's entry.
    fn applied(&self, index: u64) {
        let mut w = self.inner.lock();
        w.applied = w.applied.max(index);
        while let Some((&i, &id)) = w.placed.first_key_value() {
            if i > index {
                break;
            }
            w.placed.remove(&i);
            if let Some(tx) = w.map.remove(&id) {
                let _ = tx.send(Err(Error::LeaderChanged));
            }
        }
    }

    /// The node stopped: every waiting caller is told so, and later ones at once.
    pub fn fail_all(&self) {
        let mut w = self.inner.lock();
        w.stopped = true;
        w.placed.clear();
        for (_, tx) in w.map.drain() {
            let _ = tx.send(Err(Error::Stopped));
        }
    }

    /// Callers still waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    /// Nobody is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The member's state, shared by the apply stage (its only writer) and the server (which reads
/// it and waits on the waiters).
#[derive(Clone)]
pub struct State {
    pub store: Arc<SharedStore>,
    pub members: Arc<RwLock<Members>>,
    pub lessor: Arc<Mutex<Lessor>>,
    pub auth: Arc<RwLock<AuthStore>>,
    pub tokens: Arc<Tokens>,
    pub alarms: Arc<RwLock<Alarms>>,
    pub waiters: Arc<Waiters>,
    /// The hashes computed when compactions were scheduled (the corruption checks').
    pub hashes: Arc<crate::kv_hash::CompactionHashes>,
    /// The newest compaction revision whose deletions are all durable in the backend (a
    /// physical compaction's caller waits for it; 0 until one finishes after start).
    pub compacted: Arc<tokio::sync::watch::Sender<i64>>,
}

pub struct Applier {
    store: Arc<SharedStore>,
    /// Makes the pending batch durable when due, off this thread.
    committer: crate::committer::Committer,
    hub: Arc<keel_mvcc::watch::WatchHub>,
    lessor: Arc<Mutex<Lessor>>,
    members: Arc<RwLock<Members>>,
    waiters: Arc<Waiters>,
    member_id: u64,
    /// Where the backend lives (replaced when a snapshot from the leader is installed).
    db_path: std::path::PathBuf,
    /// Where a backend installed from the leader keeps its key index.
    index_mode: keel_mvcc::IndexMode,
    /// Told when this member has been removed from the cluster.
    removed: Arc<tokio::sync::Notify>,
    /// Whether this member leads now, asked when a new leader's no-op is applied.
    leading: Box<dyn Fn() -> bool + Send>,
    /// What a promoted lessor adds to every lease (etcd's election timeout).
    lease_extend: std::time::Duration,
    auth: Arc<RwLock<AuthStore>>,
    tokens: Arc<Tokens>,
    alarms: Arc<RwLock<Alarms>>,
    hashes: Arc<crate::kv_hash::CompactionHashes>,
    /// Published when a compaction's last batch is durable.
    compacted: Arc<tokio::sync::watch::Sender<i64>>,
    /// Set by the batch that finished a compaction (its revision, and the store's durable mark
    /// then): the revision is published on [`State::compacted`] once the committer has made the
    /// deletions durable.
    compaction_done: std::cell::Cell<Option<(i64, u64)>>,
    /// Set by a cluster version lowered (a downgrade): a snapshot is taken after the batch, as
    /// etcd forces one, so that a member restarted as the older release replays no entry of the
    /// newer cluster version (etcd refuses to start on one).
    snapshot_wish: std::cell::Cell<bool>,
    /// The last snapshot data built, with the member list and cluster version (their backend
    /// records) it was built from: the apply stage asks for it after every batch, and it
    /// changes only with those records, so it is rebuilt only when they change.
    snapshot_data: std::cell::RefCell<Option<SnapshotData>>,
    compaction: Compaction,
    /// When the compaction under way may run its next batch (after its sleep interval).
    next_compaction_batch: std::cell::Cell<std::time::Instant>,
}

/// What an [`Applier`] is built from besides the shared [`State`].
pub struct Setup {
    /// Where applied writes are published to watchers.
    pub hub: Arc<keel_mvcc::watch::WatchHub>,
    pub member_id: u64,
    /// Where the backend lives.
    pub db_path: std::path::PathBuf,
    /// Told when an applied entry removes this member.
    pub removed: Arc<tokio::sync::Notify>,
    pub compaction: Compaction,
    /// Where a backend installed from the leader keeps its key index.
    pub index_mode: keel_mvcc::IndexMode,
    /// Whether this member leads now (raft's status, which the raft thread writes before it
    /// hands over the entries of the same Ready).
    pub leading: Box<dyn Fn() -> bool + Send>,
    /// What the lessor adds to every lease when this member's leadership starts (etcd's
    /// election timeout).
    pub lease_extend: std::time::Duration,
}

/// How a compaction is paced (etcd's `--compaction-batch-limit` and
/// `--compaction-sleep-interval`): batches of `batch` keys, each under the store's write lock
/// alone, `sleep` apart (the apply stage goes on meanwhile, and the backend commits the
/// deletions in its ordinary bounded batches). A physical compaction is paced the same: its
/// caller waits (as etcd's does, with no request timeout) until the last batch is durable, while
/// writes go on.
#[derive(Debug, Clone, Copy)]
pub struct Compaction {
    pub batch: usize,
    pub sleep: std::time::Duration,
}

/// Snapshot data and the backend records (`AUX_MEMBERS`, `AUX_CLUSTER_VERSION`) it was built from.
struct SnapshotData {
    members: Option<Vec<u8>>,
    version: Option<Vec<u8>>,
    data: Vec<u8>,
}

/// Changes of the auth store (root only once auth is on).
fn is_auth_change(r: &Request) -> bool {
    matches!(
        r,
        Request::AuthEnable(_)
            | Request::AuthDisable(_)
            | Request::AuthUserAdd(_)
            | Request::AuthUserDelete(_)
            | Request::AuthUserChangePassword(_)
            | Request::AuthUserGrantRole(_)
            | Request::AuthUserRevokeRole(_)
            | Request::AuthRoleAdd(_)
            | Request::AuthRoleGrantPermission(_)
            | Request::AuthRoleRevokePermission(_)
            | Request::AuthRoleDelete(_)
    )
}

/// Checks a transaction's compares and operations (nested ones too) against the caller's
/// permissions, as etcd's auth applier does.
pub fn check_txn(auth: &AuthStore, who: &AuthInfo, t: &TxnRequest) -> Result<(), AuthError> {
    use kv::TxnPart;
    let mut result = Ok(());
    kv::walk_txn(t, &mut |part| {
        result = match part {
            TxnPart::Compare(c) => auth.check(who, &c.key, &c.range_end, Perm::Read),
            TxnPart::Range(r) => auth.check(who, &r.key, &r.range_end, Perm::Read),
            TxnPart::Put(p) => auth.check(who, &p.key, &[], Perm::Write).and_then(|()| {
                if p.prev_kv {
                    auth.check(who, &p.key, &[], Perm::Read)
                } else {
                    Ok(())
                }
            }),
            TxnPart::DeleteRange(d) => (if d.prev_kv { auth.check(who, &d.key, &d.range_end, Perm::Read) } else { Ok(()) })
                .and_then(|()| auth.check(who, &d.key, &d.range_end, Perm::Write)),
        };
        result.is_ok()
    });
    result
}

/// A lease's keys must all be writable by whoever attaches to or revokes it.
fn check_lease_keys(auth: &AuthStore, who: &AuthInfo, lessor: &Lessor, id: i64) -> Result<(), AuthError> {
    if id == 0 || !auth.enabled() {
        return Ok(());
    }
    if let Some((_, _, keys)) = lessor.time_to_live(id) {
        for k in keys {
            auth.check(who, &k, &[], Perm::Write)?;
        }
    }
    Ok(())
}

/// Ends a write transaction by its result. Every check that depends on the store comes before the
/// first change (`keel_mvcc::kv`), and every member makes the same checks: such an error rolls the
/// transaction back (nothing changed, no revision used) and goes to the client. A backend failure
/// (a record missing or unreadable) is this member's alone: answering it would let this member's
/// state part from the others', and publishing the half done would publish half an entry. The
/// transaction is rolled back and the member stops; the WAL replays the entry on restart.
fn settle<T>(w: keel_mvcc::store::WriteTxn<'_>, r: Result<T, kv::KvError>) -> Result<(T, TxnOutcome), kv::KvError> {
    match r {
        Ok(v) => Ok((v, w.finish())),
        Err(e @ (kv::KvError::Backend(_) | kv::KvError::Corrupt(_))) => {
            let changed = w.changed();
            w.rollback();
            fatal(&format!("apply: the backend failed during a write (changes made and rolled back: {changed})"), e)
        }
        Err(e) => {
            w.rollback();
            Err(e)
        }
    }
}

/// A backend failure leaves the member unable to keep its promises: stop the process, as etcd does.
fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    tracing::error!(error = %e, "{what}; stopping");
    std::process::exit(1);
}

impl Applier {
    /// The state machine over `state`, built as `setup` says.
    pub fn new(state: &State, setup: Setup) -> Applier {
        let committer = crate::committer::Committer::start(state.store.clone())
            .unwrap_or_else(|e| fatal("cannot start the backend committer thread", e));
        Applier {
            committer,
            compaction: setup.compaction,
            next_compaction_batch: std::cell::Cell::new(std::time::Instant::now()),
            store: state.store.clone(),
            hub: setup.hub,
            lessor: state.lessor.clone(),
            members: state.members.clone(),
            waiters: state.waiters.clone(),
            member_id: setup.member_id,
            db_path: setup.db_path,
            index_mode: setup.index_mode,
            removed: setup.removed,
            leading: setup.leading,
            lease_extend: setup.lease_extend,
            auth: state.auth.clone(),
            tokens: state.tokens.clone(),
            alarms: state.alarms.clone(),
            hashes: state.hashes.clone(),
            compacted: state.compacted.clone(),
            compaction_done: std::cell::Cell::new(None),
            snapshot_wish: std::cell::Cell::new(false),
            snapshot_data: std::cell::RefCell::new(None),
        }
    }

    fn store_mut(&self) -> parking_lot::RwLockWriteGuard<'_, Store> {
        self.store.write()
    }

    /// One batch of the compaction under way (the write lock held for it alone); false when
    /// none is left.
    fn compact_batch(&self) -> bool {
        let mut store = self.store_mut();
        if !store.compacting() {
            return false;
        }
        if store.pending_changes() >= COMPACTION_PENDING_MAX {
            // The committer is behind (commits run beside the applies): the next batch waits for
            // it, so that a compaction's deletions do not pile up in memory.
            self.next_compaction_batch.set(std::time::Instant::now() + self.compaction.sleep.max(COMPACTION_BACKOFF));
            self.committer.nudge();
            return true;
        }
        let t0 = std::time::Instant::now();
        store.compact_keys(self.compaction.batch);
        keel_metrics::METRICS.db_compaction_pause.observe(t0.elapsed().as_secs_f64() * 1000.0);
        self.next_compaction_batch.set(std::time::Instant::now() + self.compaction.sleep);
        if !store.compacting() {
            // Published once durable: the next batch is, at once.
            store.want_sync();
            self.compaction_done.set(Some((store.compacted_rev(), store.durable_mark())));
            if let Some(plan) = store.take_compaction_hash() {
                self.run_compaction_hash(plan);
            }
        }
        store.compacting()
    }

    /// Hashes the key space at a finished compaction's revision on a niced thread of its own
    /// (it reads every value: at 5 GB, a minute of CPU on each member), and keeps the hash for
    /// the peers' corruption checks.
    fn run_compaction_hash(&self, plan: keel_mvcc::store::HashPlan) {
        let (hashes, revision) = (self.hashes.clone(), plan.revision());
        let spawned = crate::background::spawn("compaction-hash", move || match plan.run_paced() {
            Ok((hash, _, compacted)) => {
                let compact_revision = crate::kv_hash::compact_revision(compacted);
                hashes.store(crate::kv_hash::KeyValueHash { hash, compact_revision, revision });
            }
            Err(e) => tracing::warn!(revision, error = %e, "cannot hash the key space at the compaction revision"),
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the compaction hash");
        }
    }

    /// After a compaction's last batch, once the committer has made its deletions durable: its
    /// revision published to the physical compactions waiting for it. Not committed here: the
    /// applies behind a commit of a compaction's last deletions waited for it (up to 500 ms
    /// with 16 KiB values).
    fn publish_compaction(&self) {
        let Some((rev, mark)) = self.compaction_done.get() else { return };
        if self.store.read().committed_batches() < mark {
            return;
        }
        self.compaction_done.set(None);
        self.publish_compacted(rev);
    }

    fn publish_compacted(&self, rev: i64) {
        self.compacted.send_if_modified(|c| {
            let newer = rev > *c;
            if newer {
                *c = rev;
            }
            newer
        });
    }

    fn lessor(&self) -> parking_lot::MutexGuard<'_, Lessor> {
        self.lessor.lock()
    }

    /// A no-op was applied (a new leader appends one in its term): if this member leads,
    /// everything of the terms before it is applied, and the lessor starts timing its leases
    /// here, each from its full TTL (or checkpoint) plus the election timeout, as etcd's server
    /// promotes its lessor on applying that entry. A grant applied after it is timed from its
    /// own apply. Leadership is read under the lessor's lock, where the lease duties demote.
    fn promote_lessor_if_leading(&self) {
        let mut lessor = self.lessor();
        if (self.leading)() {
            lessor.promote(self.lease_extend);
        }
    }

    /// Hands a write's effects to the lessor (key sets) and to the watchers (store lock held).
    fn after_write(&self, lessor: &mut Lessor, o: TxnOutcome) -> i64 {
        for (k, old, new) in &o.lease_changes {
            lessor.moved(k, *old, *new);
        }
        let m = &keel_metrics::METRICS;
        let mut puts = 0u64;
        for e in &o.events {
            if e.r#type == keel_proto::mvccpb::event::EventType::Put as i32 {
                puts += 1;
                if let Some(kv) = &e.kv {
                    m.total_put_size.add((kv.key.len() + kv.value.len()) as i64);
                }
            }
        }
        m.puts.inc_by(puts);
        m.deletes.inc_by(o.events.len() as u64 - puts);
        self.hub.notify(o.revision, &o.events);
        o.revision
    }

    /// The permission checks etcd's auth applier makes before a request changes anything.
    fn authorize(&self, lessor: &Lessor, who: &AuthInfo, req: &Request) -> Result<(), AuthError> {
        let auth = self.auth.read();
        match req {
            Request::Put(p) => {
                auth.check(who, &p.key, &[], Perm::Write)?;
                check_lease_keys(&auth, who, lessor, p.lease)?;
                if p.prev_kv {
                    auth.check(who, &p.key, &[], Perm::Read)?;
                }
                Ok(())
            }
            Request::DeleteRange(d) => {
                auth.check(who, &d.key, &d.range_end, Perm::Write)?;
                if d.prev_kv {
                    auth.check(who, &d.key, &d.range_end, Perm::Read)?;
                }
                Ok(())
            }
            Request::Txn(t) => check_txn(&auth, who, t),
            Request::LeaseRevoke(r) => check_lease_keys(&auth, who, lessor, r.id),
            r if is_auth_change(r) => auth.check_admin(who),
            _ => Ok(()),
        }
    }

    /// A member published its name and client URLs.
    fn set_attributes(&self, store: &mut Store, id: u64, a: MemberAttributes) -> Applied {
        keel_metrics::METRICS.store_writes.with_label_values(&["set"]).inc();
        let mut members = self.members.write();
        if let Some(m) = members.get_mut(id) {
            m.name = a.name;
            m.client_urls = a.client_urls;
        }
        store.set_aux(AUX_MEMBERS, members.encode());
        Applied::MemberAttributes
    }

    fn apply_auth(&self, store: &mut Store, req: Request) -> ApplyResult {
        let mut auth = self.auth.write();
        let r = match req {
            Request::AuthEnable(_) => auth.enable(store),
            Request::AuthDisable(_) => {
                if auth.disable(store) {
                    self.tokens.clear();
                }
                Ok(())
            }
            Request::Authenticate(a) => {
                if !auth.enabled() {
                    Err(AuthError::AuthNotEnabled)
                } else if auth.password_hash(&a.name).is_err() {
                    Err(AuthError::AuthFailed)
                } else {
                    self.tokens.assign_simple(&a.simple_token, &a.name);
                    Ok(())
                }
            }
            Request::AuthUserAdd(u) => auth.user_add(store, &u.name, u.hashed_password.as_bytes(), u.options),
            Request::AuthUserDelete(u) => auth.user_delete(store, &u.name).inspect(|_| self.tokens.invalidate_user(&u.name)),
            Request::AuthUserChangePassword(u) => {
                auth.user_change_password(store, &u.name, u.hashed_password.as_bytes()).inspect(|_| self.tokens.invalidate_user(&u.name))
            }
            Request::AuthUserGrantRole(g) => auth.user_grant_role(store, &g.user, &g.role),
            Request::AuthUserRevokeRole(g) => auth.user_revoke_role(store, &g.name, &g.role),
            Request::AuthRoleAdd(r) => auth.role_add(store, &r.name),
            Request::AuthRoleGrantPermission(r) => auth.role_grant_permission(store, &r.name, r.perm),
            Request::AuthRoleRevokePermission(r) => auth.role_revoke_permission(store, &r.role, &r.key, &r.range_end),
            Request::AuthRoleDelete(r) => auth.role_delete(store, &r.role),
            _ => return Err(Error::Internal("not an auth request".into())),
        };
        r.map(|()| (Applied::Auth, store.current_rev())).map_err(Error::Auth)
    }

    fn apply_request(&self, store: &mut Store, req: Request, who: Option<AuthInfo>) -> ApplyResult {
        let mut lessor = self.lessor();
        if let Some(who) = &who {
            self.authorize(&lessor, who, &req).map_err(Error::Auth)?;
        }
        {
            // etcd's capped applier: with NOSPACE raised only what frees space goes through;
            // with CORRUPT nothing that writes.
            let alarms = self.alarms.read();
            let adds = match &req {
                Request::Put(_) | Request::LeaseGrant(_) => true,
                Request::Txn(t) => kv::txn_has_put(t),
                _ => false,
            };
            let writes = adds || matches!(&req, Request::DeleteRange(_) | Request::Txn(_));
            if alarms.has(AlarmType::Corrupt) && writes {
                return Err(Error::Corrupt);
            }
            if alarms.has(AlarmType::Nospace) && adds {
                return Err(Error::NoSpace);
            }
        }
        store.set_events_with_prev(self.hub.wants_prev());
        match req {
            Request::Put(p) => {
                let mut w = store.write();
                let r = kv::put(&mut w, &p, &LeaseView(&lessor));
                let (resp, o) = settle(w, r).map_err(Error::Kv)?;
                Ok((Applied::Put(resp), self.after_write(&mut lessor, o)))
            }
            Request::DeleteRange(d) => {
                let mut w = store.write();
                let r = kv::delete_range(&mut w, &d);
                let (resp, o) = settle(w, r).map_err(Error::Kv)?;
                Ok((Applied::DeleteRange(resp), self.after_write(&mut lessor, o)))
            }
            Request::Txn(t) => {
                let mut w = store.write();
                let r = kv::txn(&mut w, &t, &LeaseView(&lessor));
                let (resp, o) = settle(w, r).map_err(Error::Kv)?;
                Ok((Applied::Txn(resp), self.after_write(&mut lessor, o)))
            }
            Request::LeaseGrant(g) => {
                lessor.grant(g.id, g.ttl).map_err(Error::Lease)?;
                keel_metrics::METRICS.lease_granted.inc();
                keel_metrics::METRICS.lease_ttl.observe(g.ttl as f64);
                store.set_aux(&lease::aux_key(g.id), g.ttl.to_be_bytes().to_vec());
                let resp = LeaseGrantResponse { header: None, id: g.id, ttl: g.ttl, error: String::new() };
                Ok((Applied::LeaseGrant(resp), store.current_rev()))
            }
            Request::LeaseCheckpoint(c) => {
                for cp in c.checkpoints {
                    lessor.checkpoint(cp.id, cp.remaining_ttl.saturating_mul(1000));
                }
                Ok((Applied::LeaseCheckpoint, store.current_rev()))
            }
            Request::LeaseRevoke(r) => {
                // The keys are deleted first, all in one revision; only then is the lease gone.
                let keys = lessor.keys_of(r.id).map_err(Error::Lease)?;
                let mut w = store.write();
                let deleted = keys
                    .into_iter()
                    .try_for_each(|k| kv::delete_range(&mut w, &DeleteRangeRequest { key: k, ..Default::default() }).map(drop));
                let ((), o) = settle(w, deleted).map_err(Error::Kv)?;
                // A crash here: the keys' deletion is applied, not committed, and the lease still
                // there; the restart must replay the revoke whole.
                #[cfg(feature = "failpoints")]
                fail::fail_point!("apply::lease_revoke", |_| std::process::abort());
                // The lessor's lock is held from `keys_of` on: the lease is still there. The
                // keys are gone at the new revision, so from here nothing may return early.
                if let Err(e) = lessor.revoke(r.id) {
                    fatal("apply: a lease vanished while it was revoked", e);
                }
                store.delete_aux(&lease::aux_key(r.id));
                let rev = self.after_write(&mut lessor, o);
                keel_metrics::METRICS.lease_revoked.inc();
                Ok((Applied::LeaseRevoke(LeaseRevokeResponse { header: None }), rev))
            }
            Request::Compaction(c) => {
                let t0 = std::time::Instant::now();
                // Its hash (of the data before it, as etcd's compaction computes it) is planned
                // now and run once its batches are done (`compact_batch`).
                store.compact(c.revision).map_err(Error::Kv)?;
                let m = &keel_metrics::METRICS;
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                m.index_compaction_pause.observe(ms);
                m.db_compaction_total.observe(ms);
                m.db_compaction_last
                    .set(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
                // A physical compaction's caller waits on `State::compacted` (see `Compaction`).
                Ok((Applied::Compaction(CompactionResponse { header: None }), store.current_rev()))
            }
            Request::ClusterMemberAttrSet(a) => {
                Ok((self.set_attributes(store, a.member_id, a.member_attributes.unwrap_or_default()), store.current_rev()))
            }
            Request::V2(v2) => match crate::entry::v2_member_attributes(&v2.method, &v2.path, &v2.val) {
                Some((id, a)) => Ok((self.set_attributes(store, id, a), store.current_rev())),
                None => Ok((Applied::Nothing, store.current_rev())),
            },
            Request::ClusterVersionSet(v) => {
                match semver::Version::parse(v.ver.trim()) {
                    Ok(ver) => {
                        let before = crate::membership::parse_cluster_version(store.aux(AUX_CLUSTER_VERSION));
                        if before.as_ref() != Some(&ver) {
                            tracing::info!(cluster_version = %ver, "set cluster version");
                            store.set_aux(AUX_CLUSTER_VERSION, ver.to_string().into_bytes());
                        }
                        if let Some(b) = before.filter(|b| ver < *b) {
                            tracing::info!(prev_cluster_version = %b, new_cluster_version = %ver, "Cluster version downgrade detected, forcing snapshot");
                            self.snapshot_wish.set(true);
                        }
                    }
                    Err(e) => tracing::error!(version = %v.ver, error = %e, "apply: not a cluster version; ignored"),
                }
                Ok((Applied::Nothing, store.current_rev()))
            }
            Request::DowngradeInfoSet(d) => {
                let info = if d.enabled {
                    crate::membership::Downgrade { target_version: d.ver, enabled: true }
                } else {
                    crate::membership::Downgrade::default()
                };
                if info.enabled {
                    tracing::info!(target_version = %info.target_version, "downgrade enabled: the leader lowers the cluster version to the target");
                } else {
                    tracing::info!("downgrade cancelled");
                }
                store.set_aux(crate::membership::AUX_DOWNGRADE, info.to_bytes());
                Ok((Applied::Nothing, store.current_rev()))
            }
            // Reads etcd proposes (their proposer answers them).
            ref r if crate::entry::changes_nothing(r) => Ok((Applied::Nothing, store.current_rev())),
            Request::Alarm(a) => {
                use keel_proto::etcdserverpb::alarm_request::AlarmAction;
                let mut alarms = self.alarms.write();
                let list = match AlarmAction::try_from(a.action) {
                    Ok(AlarmAction::Activate) => alarms.activate(store, a.member_id, a.alarm).into_iter().collect(),
                    Ok(AlarmAction::Deactivate) => alarms.deactivate(store, a.member_id, a.alarm).into_iter().collect(),
                    _ => alarms.get(a.alarm),
                };
                Ok((Applied::Alarm(list), store.current_rev()))
            }
            Request::MemberUpdate(u) => {
                keel_metrics::METRICS.store_writes.with_label_values(&["update"]).inc();
                let mut members = self.members.write();
                if let Some(m) = members.get_mut(u.id) {
                    m.peer_urls = u.peer_urls;
                }
                store.set_aux(AUX_MEMBERS, members.encode());
                Ok((Applied::Members(members.to_proto()), store.current_rev()))
            }
            // The auth store's changes (apply_auth refuses anything else).
            other => {
                drop(lessor);
                self.apply_auth(store, other)
            }
        }
    }
}

impl Applier {
    /// Installs a snapshot received from the leader with its backend.
    fn restore_from(&mut self, snap: &Snapshot, backend: Option<std::path::PathBuf>) -> Result<(), String> {
        let path = backend.ok_or("a snapshot arrived without the leader's backend")?;
        // Everything is checked before anything changes: the received file opens, is at least
        // as new as the snapshot and holds a member list.
        let mut new = Store::open_with(&path, self.index_mode).map_err(|e| e.to_string())?;
        if new.consistent_index() < snap.get_metadata().index {
            return Err(format!(
                "the leader's backend (index {}) is older than its snapshot (index {})",
                new.consistent_index(),
                snap.get_metadata().index
            ));
        }
        let members = match new.aux(AUX_MEMBERS) {
            Some(b) => Members::decode(b)?,
            None => Members::from_snapshot_data(snap.get_data(), self.members.read().cluster_id)?,
        };
        let mut lessor = Lessor::default();
        load_leases(&new, &mut lessor);
        let auth = AuthStore::load(&new);
        let alarms = Alarms::load(&new);
        let old = {
            let mut ex = self.store.exclusive();
            // The replaced file's blocks go back in steps, off this stage, once nothing reads it.
            ex.store.retire_backend();
            new.move_to(&self.db_path).map_err(|e| e.to_string())?;
            // A crash here: the leader's backend is in place, the raft snapshot not yet saved
            // (the log ends before the backend's index); the restart must start from the backend.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("apply::restore", |_| std::process::abort());
            let old = std::mem::replace(&mut *ex.store, new);
            // A compaction whose deletions waited for a commit of the old store: the leader's
            // state replaces it (the new store counts its own batches).
            if let Some((rev, _)) = self.compaction_done.take() {
                self.publish_compacted(rev);
            }
            self.lessor().replace_state(lessor);
            *self.auth.write() = auth;
            *self.alarms.write() = alarms;
            *self.members.write() = members;
            tracing::info!(
                consistent_index = ex.store.consistent_index(),
                revision = ex.store.current_rev(),
                "restored backend from the leader's snapshot"
            );
            old
        };
        // Closed outside the store's lock (redb records its allocator state as it closes).
        drop(old);
        self.hub.resync_all();
        Ok(())
    }
}

/// An apply slower than this is logged and counted, as etcd's "apply request took too long".
const SLOW_APPLY: std::time::Duration = std::time::Duration::from_millis(100);
/// Time spent on compaction batches per maintenance turn of the apply stage when batches are
/// not paced (a zero `--compaction-sleep-interval`); writes and reads go on in between.
const COMPACTION_SLICE: std::time::Duration = std::time::Duration::from_millis(10);
/// Uncommitted changes above which a compaction's next batch waits for the committer (two
/// backend batches' worth).
const COMPACTION_PENDING_MAX: usize = 2 * keel_mvcc::store::BATCH_LIMIT;
/// How long a compaction batch put off by [`COMPACTION_PENDING_MAX`] waits at least.
const COMPACTION_BACKOFF: std::time::Duration = std::time::Duration::from_millis(5);

/// A committed membership change, the request ID its proposer waits on, and the member record
/// it carries: etcd's JSON (`membership.Member`) with the ID in the change, or, in entries of
/// earlier Keel builds, a `keelpb.ConfChangeContext` holding both.
fn decode_member_change(data: &[u8]) -> Result<(MemberChange, u64, Option<MemberRecord>), String> {
    let cc = keel_raft::wire::member_change(data).map_err(|e| e.to_string())?;
    let ctx = cc.context.as_ref();
    let (request_id, record) = if ctx.is_empty() {
        (cc.id, None)
    } else if keel_raft::wire::is_json_record(ctx) {
        let m: MemberJson = serde_json::from_slice(ctx).map_err(|e| format!("member record: {e}"))?;
        (cc.id, Some(m.into()))
    } else {
        let old = ConfChangeContext::decode(ctx).map_err(|e| format!("member record: {e}"))?;
        (old.request_id, old.member)
    };
    Ok((cc, request_id, record))
}

impl keel_raft::StateMachine for Applier {
    fn take_snapshot_wish(&mut self) -> bool {
        self.snapshot_wish.take()
    }

    fn applied_index(&self) -> u64 {
        self.store.read().consistent_index()
    }

    fn applied_term(&self) -> u64 {
        self.store.read().consistent_term()
    }

    fn apply(&mut self, entry: &Entry) {
        let mut store = self.store_mut();
        if entry.index <= store.consistent_index() {
            // Already in the backend: a replay after restart.
            return;
        }
        let mut outcome = None;
        if !entry.get_data().is_empty() {
            match crate::entry::decode(entry.get_data()) {
                Ok(crate::entry::Decoded { id, who, request: req }) => {
                    let op = crate::entry::op_name(&req);
                    let t0 = std::time::Instant::now();
                    let r = self.apply_request(&mut store, req, who);
                    let took = t0.elapsed();
                    keel_metrics::observe_apply(op, r.is_ok(), took);
                    if took > SLOW_APPLY {
                        keel_metrics::METRICS.slow_applies.inc();
                        tracing::warn!(index = entry.index, op, took = ?took, expected = ?SLOW_APPLY, "apply request took too long");
                    }
                    outcome = Some((id, r))
                }
                // Every member would skip it the same way, but it means the log is not what was
                // proposed (or holds a request kind from a newer etcd, which etcd's own cluster
                // version rules keep out): stop rather than diverge, as etcd's applier does.
                Err(e) => fatal(&format!("apply: the committed entry at index {} cannot be decoded", entry.index), e),
            }
        }
        store.set_consistent_index(entry.index, entry.term);
        drop(store);
        if entry.get_data().is_empty() {
            self.promote_lessor_if_leading();
        }
        if let Some((id, r)) = outcome {
            if id != 0 {
                self.waiters.trigger(id, r);
            }
        }
        self.waiters.applied(entry.index);
    }

    fn apply_conf_change(&mut self, entry: &Entry, _cs: &ConfState) {
        let mut store = self.store_mut();
        if entry.index <= store.consistent_index() {
            return;
        }
        // Members propose conf changes they encoded themselves: a committed one that does not
        // decode is corruption (or a bug), which skipping would hide; every member stops alike.
        let (cc, request_id, record) = match decode_member_change(entry.get_data()) {
            Ok(x) => x,
            Err(e) => fatal(&format!("apply: the committed conf change at index {} cannot be decoded", entry.index), e),
        };
        let id = cc.node_id;
        let mut removed_self = false;
        let list = {
            let mut members = self.members.write();
            match cc.kind {
                ChangeKind::AddNode | ChangeKind::AddLearnerNode => {
                    let learner = cc.kind == ChangeKind::AddLearnerNode;
                    match (members.get_mut(id), record) {
                        // An add of a member already there: a learner promoted (etcd's promote).
                        (Some(m), _) => m.is_learner = learner,
                        (None, Some(mut rec)) => {
                            rec.id = id;
                            rec.is_learner = learner;
                            tracing::info!(member_id = format!("{id:x}"), peer_urls = ?rec.peer_urls, learner, "added member");
                            keel_metrics::METRICS.store_writes.with_label_values(&["create"]).inc();
                            members.upsert(rec);
                        }
                        (None, None) => tracing::warn!(member_id = format!("{id:x}"), "conf change adds a member without its record"),
                    }
                }
                ChangeKind::UpdateNode => {
                    keel_metrics::METRICS.store_writes.with_label_values(&["update"]).inc();
                    match (members.get_mut(id), record) {
                        (Some(m), Some(rec)) => {
                            tracing::info!(member_id = format!("{id:x}"), peer_urls = ?rec.peer_urls, "updated member");
                            m.peer_urls = rec.peer_urls;
                        }
                        _ => tracing::warn!(member_id = format!("{id:x}"), "conf change updates a member that is not there"),
                    }
                }
                ChangeKind::RemoveNode => {
                    if members.remove(id) {
                        tracing::info!(member_id = format!("{id:x}"), "removed member");
                        keel_metrics::METRICS.store_writes.with_label_values(&["delete"]).inc();
                    }
                    removed_self = id == self.member_id;
                }
            }
            store.set_aux(AUX_MEMBERS, members.encode());
            members.to_proto()
        };
        store.set_consistent_index(entry.index, entry.term);
        let rev = store.current_rev();
        drop(store);
        if request_id != 0 {
            self.waiters.trigger(request_id, Ok((Applied::Members(list), rev)));
        }
        self.waiters.applied(entry.index);
        if removed_self {
            tracing::warn!("the member has been permanently removed from the cluster");
            self.removed.notify_one();
        }
    }

    fn removed_members(&self) -> Vec<u64> {
        self.members.read().removed.clone()
    }

    fn conf_state(&self) -> Option<ConfState> {
        let members = self.members.read();
        let (learners, voters): (Vec<_>, Vec<_>) = members.members.iter().partition(|m| m.is_learner);
        if voters.is_empty() {
            return None;
        }
        Some(ConfState {
            voters: voters.iter().map(|m| m.id).collect(),
            learners: learners.iter().map(|m| m.id).collect(),
            ..Default::default()
        })
    }

    fn skip_conf_change(&mut self, entry: &Entry) {
        let mut store = self.store_mut();
        if entry.index <= store.consistent_index() {
            return;
        }
        tracing::warn!(index = entry.index, "apply: raft refused the committed conf change; the membership is unchanged");
        let request_id = decode_member_change(entry.get_data()).map(|(_, id, _)| id).unwrap_or(0);
        store.set_consistent_index(entry.index, entry.term);
        drop(store);
        if request_id != 0 {
            self.waiters.trigger(request_id, Err(Error::ConfChangeRefused));
        }
        self.waiters.applied(entry.index);
    }

    fn restore(&mut self, snap: &Snapshot, backend: Option<std::path::PathBuf>) -> Result<(), String> {
        let m = &keel_metrics::METRICS;
        m.snapshot_apply_in_progress.set(1);
        // The member list is replaced whole, whatever its backend record says.
        *self.snapshot_data.borrow_mut() = None;
        let r = self.restore_from(snap, backend);
        m.snapshot_apply_in_progress.set(0);
        r
    }

    fn maintain(&mut self) {
        // A compaction's batches run here, one per sleep interval, with the store free in
        // between (back to back for up to a slice when the interval is zero).
        let t0 = std::time::Instant::now();
        while std::time::Instant::now() >= self.next_compaction_batch.get() && self.compact_batch() {
            if !self.compaction.sleep.is_zero() || t0.elapsed() >= COMPACTION_SLICE {
                break;
            }
        }
        self.publish_compaction();
        if self.store.read().commit_due() {
            self.committer.nudge();
        }
    }

    fn maintain_in(&self) -> Option<std::time::Duration> {
        self.store.read().compacting().then(|| self.next_compaction_batch.get().saturating_duration_since(std::time::Instant::now()))
    }

    fn sync(&mut self) -> Result<(), String> {
        self.store.commit().map_err(|e| e.to_string())
    }

    fn durable_index(&self) -> Option<u64> {
        // The committer makes every applied entry durable within a batch interval or two.
        Some(self.store.read().committed_index())
    }

    fn on_stop(&mut self) {
        self.waiters.fail_all();
    }

    fn snapshot_data(&self) -> Vec<u8> {
        let store = self.store.read();
        let (members, version) = (store.aux(AUX_MEMBERS), store.aux(AUX_CLUSTER_VERSION));
        let mut cache = self.snapshot_data.borrow_mut();
        if let Some(c) = cache.as_ref().filter(|c| c.members.as_deref() == members && c.version.as_deref() == version) {
            return c.data.clone();
        }
        let parsed = crate::membership::parse_cluster_version(version).map(|v| v.to_string());
        let data = self.members.read().to_snapshot_data(parsed.as_deref().unwrap_or(keel_config::ETCD_CLUSTER_VERSION));
        *cache = Some(SnapshotData { members: members.map(<[u8]>::to_vec), version: version.map(<[u8]>::to_vec), data: data.clone() });
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_raft::Proposed;

    fn ok(rev: i64) -> ApplyResult {
        Ok((Applied::LeaseCheckpoint, rev))
    }

    #[test]
    fn a_proposal_overwritten_by_a_new_leader_is_answered_when_its_index_is_applied() {
        let w = Waiters::default();
        let mut mine = w.register(1);
        let mut other = w.register(2);
        w.placed(1, Proposed { index: 10, term: 3 });
        w.placed(2, Proposed { index: 11, term: 3 });
        // Index 10 is applied with another request (a new leader's entry): 1 was lost.
        w.applied(9);
        assert!(mine.try_recv().is_err(), "not answered before its index is applied");
        w.applied(10);
        let lost = mine.try_recv().expect("answered at once").unwrap_err();
        assert!(matches!(lost, Error::LeaderChanged), "{lost:?}");
        // Its own entry at 11 answers 2 normally, and applying 11 does not fail it afterwards.
        w.trigger(2, ok(7));
        w.applied(11);
        assert_eq!(other.try_recv().unwrap().unwrap().1, 7);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn a_proposal_placed_after_its_index_was_applied_is_lost_at_once() {
        let w = Waiters::default();
        w.applied(20);
        let mut rx = w.register(5);
        w.placed(5, Proposed { index: 20, term: 2 });
        assert!(rx.try_recv().unwrap().is_err());
        // A follower's proposal (no place known) keeps waiting for its entry.
        let mut f = w.register(6);
        w.applied(30);
        assert!(f.try_recv().is_err());
        w.trigger(6, ok(1));
        assert!(f.try_recv().unwrap().is_ok());
    }

    /// An applier over a fresh store in `dir`, leading or not as `leading` says.
    fn applier(dir: &std::path::Path, leading: bool) -> (Applier, State) {
        let store = Store::open(&dir.join("db")).unwrap();
        let state = State {
            lessor: Arc::default(),
            auth: Arc::new(RwLock::new(AuthStore::load(&store))),
            tokens: Arc::new(Tokens::from_flag("simple", std::time::Duration::from_secs(300)).unwrap()),
            alarms: Arc::new(RwLock::new(Alarms::load(&store))),
            store: Arc::new(SharedStore::new(store)),
            members: Arc::default(),
            waiters: Arc::default(),
            hashes: Arc::default(),
            compacted: Arc::new(tokio::sync::watch::channel(0).0),
        };
        let hub = keel_mvcc::watch::WatchHub::new(state.store.clone(), Box::new(|| 2), 1, 1, 1 << 20);
        let setup = Setup {
            hub,
            member_id: 1,
            db_path: dir.join("db"),
            removed: Arc::default(),
            compaction: Compaction { batch: 1000, sleep: std::time::Duration::ZERO },
            index_mode: keel_mvcc::IndexMode::default(),
            leading: Box::new(move || leading),
            lease_extend: std::time::Duration::from_secs(1),
        };
        (Applier::new(&state, setup), state)
    }

    fn entry(index: u64, data: Vec<u8>) -> Entry {
        Entry { index, term: 2, data: data.into(), ..Default::default() }
    }

    fn grant(id: i64, ttl: i64) -> Vec<u8> {
        let r = keel_proto::etcdserverpb::LeaseGrantRequest { id, ttl };
        crate::entry::encode(0, &AuthInfo::default(), Request::LeaseGrant(r))
    }

    /// A lease granted just after an election is timed from its grant: the lessor is promoted
    /// when the new leader's no-op is applied, before any request of its term (as etcd's), not
    /// when a timer notices the leadership later and gives every lease an election timeout
    /// more (a 3 s lease then lived 4 s, and etcd's e2e TTL tests saw it still there).
    #[test]
    fn the_new_leaders_no_op_starts_the_lease_clocks() {
        use keel_raft::StateMachine;
        let dir = tempfile::tempdir().unwrap();
        let (mut a, state) = applier(dir.path(), true);
        a.apply(&entry(1, vec![]));
        assert!(state.lessor.lock().is_primary(), "promoted at the no-op");
        a.apply(&entry(2, grant(7, 3)));
        let due = state.lessor.lock().due_checkpoints(10);
        assert_eq!(due.len(), 1, "the lease is timed from its grant: {due:?}");
        assert!(due[0].1 > 2_000 && due[0].1 <= 3_000, "a full TTL from the grant, no extension: {due:?}");

        let dir = tempfile::tempdir().unwrap();
        let (mut f, state) = applier(dir.path(), false);
        f.apply(&entry(1, vec![]));
        f.apply(&entry(2, grant(7, 3)));
        assert!(!state.lessor.lock().is_primary(), "a follower times no lease");
        assert!(state.lessor.lock().due_checkpoints(10).is_empty());
    }

    #[test]
    fn stopping_answers_everyone_waiting_and_every_later_caller() {
        let w = Waiters::default();
        let mut a = w.register(1);
        let mut b = w.register(2);
        w.placed(2, Proposed { index: 4, term: 1 });
        w.fail_all();
        for rx in [&mut a, &mut b] {
            assert!(matches!(rx.try_recv().unwrap().unwrap_err(), Error::Stopped));
        }
        let mut late = w.register(3);
        assert!(matches!(late.try_recv().unwrap().unwrap_err(), Error::Stopped));
    }
}

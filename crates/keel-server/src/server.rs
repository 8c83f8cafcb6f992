//! The member's core: what every API handler shares. Turns client writes into raft proposals and
//! waits for their apply; gives reads a linearizable barrier; builds response headers.
//!
//! Calls keel-raft (propose, read index) and reads keel-mvcc; never writes the store itself.

use crate::alarm::Alarms;
use crate::apply::{Applied, State};
use crate::error::Error;
use crate::membership::{MemberJson, Members};
use keel_auth::{AuthError, AuthInfo, AuthStore, Tokens};
use keel_config::Config;
use keel_lease::Lessor;
use keel_mvcc::Store;
use keel_proto::etcdserverpb::ResponseHeader;
use keel_proto::keelpb::{internal_raft_request::Request, MemberRecord};
use keel_raft::wire::{ChangeKind, MemberChange};
use keel_raft::{NodeHandle, NodeStatus};
use parking_lot::{MutexGuard, RwLockReadGuard};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Writes into a defragment's `copy` what `store` committed since the copy began, in rounds (each
/// writing what came in during the previous one), without holding the store while writing;
/// returns the records written.
fn catch_up_defrag(store: &keel_mvcc::SharedStore, copy: &keel_mvcc::backend::Backend) -> Result<usize, keel_mvcc::backend::BackendError> {
    let mut written = 0;
    for _ in 0..DEFRAG_CATCH_UP_ROUNDS {
        let taken = store.write().take_defrag_tail();
        let Some(batch) = taken? else { break };
        let n = batch.changes.len() + batch.aux.len();
        batch.write_to(copy)?;
        written += n;
        if n <= DEFRAG_SWAP_RECORDS {
            break;
        }
    }
    Ok(written)
}

/// Most rounds of writing what was committed during a defragment's copy into the copy before
/// the swap (each round writes what came in during the previous one).
const DEFRAG_CATCH_UP_ROUNDS: usize = 8;
/// Records few enough for the swap to write while it holds the store.
const DEFRAG_SWAP_RECORDS: usize = 1_000;

pub struct Server {
    cfg: Config,
    member_id: u64,
    cluster_id: u64,
    state: State,
    node: NodeHandle,
    /// Serializes defragmentations of this member's backend.
    defrag_lock: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    /// Bytes of this member's proposals between their proposal and their answer: one permit a
    /// byte, [`Server::proposal_budget`] of them.
    proposing: tokio::sync::Semaphore,
    /// etcd 3.7's `FastLeaseKeepAlive` gate, resolved once (asked on every keep-alive).
    fast_lease_keep_alive: bool,
}

impl Server {
    pub fn new(cfg: Config, member_id: u64, cluster_id: u64, state: State, node: NodeHandle) -> Arc<Server> {
        // Request ids: member id in the top 16 bits, start time and a counter below, so ids stay
        // unique across restarts of this member.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let base = ((member_id & 0xffff) << 48) | ((now & 0xff_ffff_ffff) << 8);
        let budget = Server::proposal_budget(&cfg);
        Arc::new(Server {
            fast_lease_keep_alive: cfg.feature("FastLeaseKeepAlive"),
            cfg,
            member_id,
            cluster_id,
            state,
            node,
            defrag_lock: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(base),
            proposing: tokio::sync::Semaphore::new(budget),
        })
    }

    /// The configuration this member started with.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The applied cluster version; None until a leader decided one.
    /// The downgrade applied last (etcd's downgrade info).
    pub fn downgrade(&self) -> crate::membership::Downgrade {
        crate::membership::Downgrade::parse(self.store().aux(crate::membership::AUX_DOWNGRADE))
    }

    pub fn cluster_version(&self) -> Option<semver::Version> {
        crate::membership::parse_cluster_version(self.store().aux(crate::membership::AUX_CLUSTER_VERSION))
    }

    /// The hashes this member computed when it scheduled its newest compactions.
    pub fn compaction_hashes(&self) -> &crate::kv_hash::CompactionHashes {
        &self.state.hashes
    }

    /// etcd's `HashByRev`: the hash stored for compaction revision `rev` if there is one, else
    /// the key space hashed up to `rev` (0: the current revision); with the current revision.
    /// The error is etcd's text (`mvcc: required revision has been compacted`, ...).
    pub async fn hash_by_rev(&self, rev: i64) -> Result<(crate::kv_hash::KeyValueHash, i64), String> {
        if rev > 0 {
            if let Some(h) = self.state.hashes.at(rev) {
                return Ok((h, self.store().current_rev()));
            }
        }
        let plan = self.store().plan_hash_kv(rev).map_err(|e| e.to_string())?;
        let revision = plan.revision();
        let (hash, current, compacted) =
            tokio::task::spawn_blocking(move || plan.run()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let compact_revision = crate::kv_hash::compact_revision(compacted);
        Ok((crate::kv_hash::KeyValueHash { hash, compact_revision, revision }, current))
    }

    /// The storage version: the applied cluster version's major.minor.0; None until a leader
    /// decided one (etcd reports "" in Status and Snapshot then, "unknown" on `/version`).
    pub fn storage_version(&self) -> Option<String> {
        crate::membership::storage_version(self.cluster_version().as_ref())
    }

    /// Raft's live status (leader, term, commit and applied indexes), read without the node.
    pub fn raft(&self) -> &NodeStatus {
        &self.node.status
    }

    /// The token provider (simple tokens or JWT).
    pub fn tokens(&self) -> &Tokens {
        &self.state.tokens
    }

    /// Proposals waiting for their apply on this member.
    pub fn pending_proposals(&self) -> usize {
        self.state.waiters.len()
    }

    /// Plans a Range under the store's read lock; the caller loads it with no lock held.
    /// A read-only transaction planned under the store's read lock (values read by `finish`).
    pub fn plan_txn_read(&self, r: &keel_proto::etcdserverpb::TxnRequest) -> Result<keel_mvcc::kv::TxnReadPlan, keel_mvcc::KvError> {
        self.state.store.plan_txn_read(r)
    }

    pub fn plan_range(&self, r: &keel_proto::etcdserverpb::RangeRequest) -> Result<keel_mvcc::shared::PlannedRange, keel_mvcc::KvError> {
        self.state.store.plan_range(r)
    }

    /// Whether a renewal on the leader waits for its apply only when the lease is not there yet
    /// (etcd 3.7's `FastLeaseKeepAlive`, on by default) rather than always.
    pub fn fast_lease_keep_alive(&self) -> bool {
        self.fast_lease_keep_alive
    }

    /// One page of a streamed range (see [`keel_mvcc::SharedStore::plan_page`]).
    pub fn plan_range_page(
        &self,
        key: &[u8],
        end: &[u8],
        rev: i64,
        limit: usize,
        fetch: keel_mvcc::store::Fetch,
    ) -> Result<keel_mvcc::shared::PlannedPage, keel_mvcc::KvError> {
        self.state.store.plan_page(key, end, rev, limit, fetch)
    }

    /// The number of keys in `[key, end)` at revision `at`, from the index.
    pub fn count_range_at(&self, key: &[u8], end: &[u8], at: i64) -> Result<i64, keel_mvcc::KvError> {
        self.state.store.count_at(key, end, at)
    }

    /// The backend with everything applied so far committed to it (for a hash or a copy).
    pub fn committed_backend(&self) -> Result<keel_mvcc::backend::Backend, keel_mvcc::backend::BackendError> {
        self.state.store.committed_backend()
    }

    /// Defragments this member's backend without stopping it: copy the committed state into a
    /// new file while applies and reads go on, write what was committed meanwhile into the copy
    /// (a few rounds, still not holding the store), then, holding the store briefly, the last
    /// few records and swap it in. Returns the longest time requests were held.
    pub async fn defragment(&self) -> Result<std::time::Duration, keel_mvcc::backend::BackendError> {
        let _one = self.defrag_lock.lock().await;
        let store = &self.state.store;
        let started = std::time::Instant::now();
        let before = self.store().db_size();
        let (backend, with_index) = {
            let mut ex = store.exclusive();
            (ex.store.begin_defrag()?, ex.store.copies_index())
        };
        let dest = keel_mvcc::store::defrag_path(backend.path());
        // The copy, and its pages in use counted (a walk of the new file) before the store is
        // held for the swap.
        let copied = crate::background::run("defrag-copy", move || {
            let (copy, _) = backend.copy_to(&dest, with_index)?;
            let in_use = copy.pages_in_use()?;
            Ok((copy, in_use))
        })
        .await
        .unwrap_or_else(|e| {
            Err(keel_mvcc::backend::BackendError { path: std::path::PathBuf::new(), msg: format!("defragment task failed: {e}") })
        });
        // What was committed meanwhile goes to the copy without holding the store, until little
        // is left for the swap to write while it holds it.
        let prepared = copied.and_then(|(copy, copy_in_use)| Ok((catch_up_defrag(store, &copy)?, copy, copy_in_use)));
        let (caught_up, copy, copy_in_use) = match prepared {
            Ok(p) => p,
            Err(e) => {
                store.write().abort_defrag();
                return Err(e);
            }
        };
        let held = std::time::Instant::now();
        let (replayed, old) = store.exclusive().store.finish_defrag(copy, copy_in_use)?;
        let replayed = replayed + caught_up;
        let stall = held.elapsed();
        // Closing the old file (redb flushes its allocator state) happens off the store lock.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        let after = self.store().db_size();
        tracing::info!(
            took = ?started.elapsed(),
            stall = ?stall,
            replayed_records = replayed,
            size_before = before,
            size_after = after,
            "finished defragmenting the backend"
        );
        Ok(stall)
    }

    /// Asks raft to hand leadership to `to` (the caller waits for it to show in [`Self::raft`]).
    pub fn transfer_leader(&self, to: u64) -> Result<(), Error> {
        self.node.transfer_leader(to).map_err(Error::Propose)
    }

    /// What a `/metrics` scrape reports of this member now.
    pub fn scrape(&self) -> keel_metrics::Scrape {
        let st = self.raft();
        let me = self.member_id();
        let (is_learner, members) = {
            let m = self.members();
            (m.get(me).is_some_and(|x| x.is_learner), m.ids().collect())
        };
        let store = self.store();
        keel_metrics::Scrape {
            has_leader: st.leader() != 0,
            is_leader: st.is_leader(),
            is_learner,
            leader_changes: st.leader_changes(),
            committed: st.commit(),
            applied: st.applied(),
            raft_log_first_index: st.log_first_index(),
            raft_log_memory_first_index: st.log_memory_first_index(),
            pending_proposals: self.pending_proposals(),
            member_id: me,
            quota_backend_bytes: self.cfg().quota_backend_bytes_reported(),
            members,
            db_size: store.db_size(),
            db_size_in_use: store.db_size_in_use(),
            data_size: store.data_size(),
            keys: store.live_key_count(),
            current_revision: store.current_rev(),
            compacted_revision: store.compacted_rev(),
            auth_revision: self.auth().revision(),
        }
    }

    /// Records the backend's pages in use (see `keel_mvcc::Store::set_pages_in_use`).
    pub fn set_pages_in_use(&self, pages: u64, data: u64) {
        self.state.store.write().set_pages_in_use(pages, data);
    }

    pub fn store(&self) -> RwLockReadGuard<'_, Store> {
        self.state.store.read()
    }

    pub fn lessor(&self) -> MutexGuard<'_, Lessor> {
        self.state.lessor.lock()
    }

    /// A new lease ID: positive, unique to this member (etcd derives them the same way as request IDs).
    pub fn new_lease_id(&self) -> i64 {
        loop {
            let id = (self.next_id.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)) as i64;
            if id != 0 && !self.lessor().exists(id) {
                return id;
            }
        }
    }

    /// etcd's minimum lease TTL: 1.5 election timeouts, rounded up to seconds.
    pub fn min_lease_ttl(&self) -> i64 {
        let ms = 3 * self.cfg.election_timeout / 2;
        ms.div_ceil(1000) as i64
    }

    pub fn auth(&self) -> RwLockReadGuard<'_, AuthStore> {
        self.state.auth.read()
    }

    /// A number unique to this member (request ids, token suffixes).
    pub fn next_seq(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Who sent a client request: the user of its token, else the common name of its verified
    /// client certificate when `--client-cert-auth` is on, else nobody (an empty [`AuthInfo`]).
    pub fn auth_info(&self, token: Option<&str>, cert_common_name: Option<&str>) -> Result<AuthInfo, Error> {
        if let Some(t) = token {
            let rev = self.auth().revision();
            return self.state.tokens.info(t, rev).ok_or(Error::Auth(AuthError::InvalidToken));
        }
        if self.cfg.client_cert_auth {
            if let Some(cn) = cert_common_name {
                return Ok(AuthInfo { username: cn.to_string(), revision: self.auth().revision() });
            }
        }
        Ok(AuthInfo::default())
    }

    /// Fails unless the caller may administer the cluster (root role), when auth is on.
    pub fn check_admin(&self, who: &AuthInfo) -> Result<(), Error> {
        self.auth().check_admin(who).map_err(Error::Auth)
    }

    /// Fails unless the caller may read `key`..`range_end`, when auth is on.
    pub fn check_read(&self, who: &AuthInfo, key: &[u8], range_end: &[u8]) -> Result<(), Error> {
        self.auth().check(who, key, range_end, keel_auth::Perm::Read).map_err(Error::Auth)
    }

    pub fn alarms(&self) -> RwLockReadGuard<'_, Alarms> {
        self.state.alarms.read()
    }

    /// The backend quota in bytes (`--quota-backend-bytes`: 0 means etcd's 2 GiB default, a
    /// negative value turns the quota off).
    pub fn quota_bytes(&self) -> Option<u64> {
        u64::try_from(self.cfg.quota_backend_bytes_reported()).ok()
    }

    /// etcd's quota check before a write that adds `cost` bytes: when the data would not fit,
    /// raise the NOSPACE alarm for this member and fail with etcd's error.
    pub async fn check_quota(&self, cost: u64) -> Result<(), Error> {
        let Some(quota) = self.quota_bytes() else { return Ok(()) };
        if cost == 0 || self.store().data_size() + cost < quota {
            return Ok(());
        }
        let req = keel_proto::etcdserverpb::AlarmRequest {
            action: keel_proto::etcdserverpb::alarm_request::AlarmAction::Activate as i32,
            member_id: self.member_id,
            alarm: keel_proto::etcdserverpb::AlarmType::Nospace as i32,
        };
        if let Err(e) = self.propose(Request::Alarm(req)).await {
            tracing::warn!(error = %e, "could not raise the NOSPACE alarm");
        }
        Err(Error::NoSpace)
    }

    pub fn members(&self) -> RwLockReadGuard<'_, Members> {
        self.state.members.read()
    }

    /// A response header at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { cluster_id: self.cluster_id, member_id: self.member_id, revision, raft_term: self.raft().term() })
    }

    /// Proposes the member's own request `req` (with no user: etcd's apply checks permissions
    /// only of client writes, lease revokes and auth changes) and waits until it is applied on
    /// this member.
    /// Waits until the compaction at `rev`, or a newer one, is physically done: every revision
    /// it supersedes deleted, durably (etcd's `physical` Compact, which waits with no request
    /// timeout while writes go on).
    pub async fn wait_compacted(&self, rev: i64) -> Result<(), Error> {
        let mut rx = self.state.compacted.subscribe();
        rx.wait_for(|c| *c >= rev).await.map(|_| ()).map_err(|_| Error::Stopped)
    }

    pub async fn propose(&self, req: Request) -> Result<(Applied, i64), Error> {
        self.propose_inner(req, &AuthInfo::default()).await
    }

    /// Proposes a client's request, checked against `who`'s permissions when applied.
    pub async fn propose_as(&self, req: Request, who: &AuthInfo) -> Result<(Applied, i64), Error> {
        self.propose_inner(req, who).await
    }

    /// Proposes one of this member's own requests that etcd's apply checks permissions for
    /// (revoking an expired lease) as root at the current auth revision, as etcd does: with
    /// auth on, it fails if auth changes before it is applied, and is retried.
    pub async fn propose_as_root(&self, req: Request) -> Result<(Applied, i64), Error> {
        let root = AuthInfo { username: "root".into(), revision: self.auth().revision() };
        self.propose_inner(req, &root).await
    }

    async fn propose_inner(&self, req: Request, who: &AuthInfo) -> Result<(Applied, i64), Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // etcd 3.7's PriorityRequest: lease revocations go in while the apply lags further.
        let priority = matches!(req, Request::LeaseRevoke(_)) && self.cfg.feature("PriorityRequest");
        let kind = crate::entry::op_name(&req);
        let data = crate::entry::encode(id, who, req);
        if data.len() > self.cfg.max_request_bytes as usize {
            return Err(Error::RequestTooLarge);
        }
        let _budget = self.take_proposing(data.len())?;
        let rx = self.state.waiters.register(id);
        let t0 = std::time::Instant::now();
        let failed = || keel_metrics::METRICS.proposals_failed.inc();
        let work = async {
            if let Some(at) = self.node.propose_with(data, priority).await.map_err(Error::Propose).inspect_err(|_| failed())? {
                self.state.waiters.placed(id, at);
            }
            rx.await.map_err(|_| Error::Stopped).inspect_err(|_| failed())?
        };
        let r = tokio::time::timeout(self.cfg.request_timeout(), work).await;
        keel_metrics::observe_request(kind, matches!(r, Ok(Ok((_, _)))), t0.elapsed());
        match r {
            Ok(r) => {
                keel_metrics::METRICS.proposal.observe(t0.elapsed().as_secs_f64());
                if r.is_err() {
                    self.state.waiters.cancel(id);
                }
                r
            }
            Err(_) => {
                failed();
                self.state.waiters.cancel(id);
                Err(Error::Timeout)
            }
        }
    }

    /// Counts `n` bytes of a proposal, or refuses it with etcd's "too many requests" when
    /// `--max-pending-proposal-bytes` are already held (raft's inbox and uncommitted log, the apply queue,
    /// the waiting callers), so that many concurrent large writes cannot make the member hold
    /// their bytes without bound. One request of `--max-request-bytes` always fits.
    fn take_proposing(&self, n: usize) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        match u32::try_from(n).ok().and_then(|n| self.proposing.try_acquire_many(n).ok()) {
            Some(p) => Ok(p),
            None => {
                keel_metrics::METRICS.proposals_failed.inc();
                let (limit, free) = (Server::proposal_budget(&self.cfg), self.proposing.available_permits());
                tracing::debug!(held = limit - free, limit, request_bytes = n, "refused a proposal: too many bytes of proposals in flight");
                Err(Error::TooManyRequests)
            }
        }
    }

    /// The bytes of proposals a member holds at most (`--max-pending-proposal-bytes`; one request
    /// of `--max-request-bytes` always fits).
    fn proposal_budget(cfg: &Config) -> usize {
        (cfg.max_pending_proposal_bytes as usize).max(cfg.max_request_bytes as usize + 4096).min(tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// Proposes a raft membership change for `node_id` carrying `member` (etcd's JSON record as
    /// the change's context; a removal carries none), and waits until it is applied here;
    /// returns the member list after it.
    pub async fn propose_conf_change(&self, kind: ChangeKind, node_id: u64, member: Option<MemberRecord>) -> Result<(Applied, i64), Error> {
        let context = member.map(|m| MemberJson::from(&MemberRecord { id: node_id, ..m }).to_bytes()).unwrap_or_default();
        self.propose_member_change(kind, node_id, context).await
    }

    async fn propose_member_change(&self, kind: ChangeKind, node_id: u64, context: Vec<u8>) -> Result<(Applied, i64), Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cc = MemberChange { id, kind, node_id, context: context.into() };
        let rx = self.state.waiters.register(id);
        let work = async {
            if let Some(at) = self.node.propose_conf_change(cc).await.map_err(Error::Propose)? {
                self.state.waiters.placed(id, at);
            }
            rx.await.map_err(|_| Error::Stopped)?
        };
        let r = match tokio::time::timeout(self.cfg.request_timeout(), work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout),
        };
        if r.is_err() {
            self.state.waiters.cancel(id);
        }
        r
    }

    /// Promotes learner `id` to a voter, on the leader (etcd's rule: the learner has at least 90%
    /// of the leader's log); returns the member list after it.
    pub async fn promote_learner(&self, id: u64) -> Result<Vec<keel_proto::etcdserverpb::Member>, Error> {
        let m = self.members().get(id).cloned().ok_or(Error::MemberNotFound)?;
        if !m.is_learner {
            return Err(Error::NotLearner);
        }
        let progress = self.node.progress().await.map_err(Error::Propose)?;
        let leader = progress.get(&self.member_id).ok_or(Error::NotLeader)?;
        let learner = progress.get(&id).ok_or(Error::LearnerNotReady)?;
        if (learner.matched as f64) < (leader.matched as f64) * 0.9 {
            return Err(Error::LearnerNotReady);
        }
        // etcd's promotion: an add of the member, its record only its ID and `isPromote`.
        let promote = MemberJson { id, peer_urls: vec![], is_learner: false, name: String::new(), client_urls: vec![], is_promote: true };
        match self.propose_member_change(ChangeKind::AddNode, id, promote.to_bytes()).await? {
            (Applied::Members(m), _) => {
                keel_metrics::METRICS.learner_promotes.inc();
                Ok(m)
            }
            _ => Err(Error::Internal("unexpected apply result".into())),
        }
    }

    /// True when this member is a learner (it does not serve writes or linearizable reads).
    pub fn is_learner(&self) -> bool {
        self.members().get(self.member_id).map(|m| m.is_learner).unwrap_or(false)
    }

    /// Fails with etcd's error when this member is a learner.
    pub fn not_learner(&self) -> Result<(), Error> {
        if self.is_learner() {
            return Err(Error::Learner);
        }
        Ok(())
    }

    /// Waits until this member has applied everything committed before the call (ReadIndex).
    pub async fn linearizable_barrier(&self) -> Result<(), Error> {
        let m = &keel_metrics::METRICS;
        match tokio::time::timeout(self.cfg.request_timeout(), self.node.read_index()).await {
            Ok(r) => r.map(|_| ()).map_err(Error::Propose).inspect_err(|_| m.read_indexes_failed.inc()),
            Err(_) => {
                m.slow_read_indexes.inc();
                m.read_indexes_failed.inc();
                Err(Error::Timeout)
            }
        }
    }
}

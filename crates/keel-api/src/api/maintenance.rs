//! etcdserverpb.Maintenance: Status, Alarm, Defragment, Hash, HashKV, Snapshot, MoveLeader.
//!
//! Defragment rewrites the backend into a compact copy while requests keep flowing (only the
//! final swap holds the store); Snapshot streams such a copy followed by its sha256, as etcd.

use crate::errors;
use keel_config::ETCD_VERSION;
use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::internal_raft_request::Request as Internal;
use keel_proto::keelpb::DowngradeInfoSetRequest;
use keel_server::apply::Applied;
use keel_server::server::Server;
use sha2::Digest;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct MaintenanceService {
    pub server: Arc<Server>,
}

type SnapshotStream = Pin<Box<dyn futures::Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

/// Bytes per snapshot message (etcd's 32 KiB).
const SNAPSHOT_CHUNK: usize = 32 * 1024;

fn backend_err(e: keel_mvcc::backend::BackendError) -> Status {
    Status::internal(format!("etcdserver: {e}"))
}

/// The committed backend as an etcd backend (bbolt, etcd's schema: what etcd's snapshot holds, so
/// that etcdctl, etcdutl and etcd read it), in a temporary file next to the backend.
async fn backend_copy(s: &Server) -> Result<std::path::PathBuf, Status> {
    let backend = s.committed_backend().map_err(backend_err)?;
    let mut name = backend.path().as_os_str().to_owned();
    name.push(format!(".snapshot-{:x}", s.next_seq()));
    let dest = std::path::PathBuf::from(name);
    let d = dest.clone();
    let made = keel_server::background::run("snapshot-copy", move || -> anyhow::Result<()> {
        let f = std::fs::File::create(&d)?;
        keel_migrate::backend::export_staged(&backend, f)?;
        Ok(())
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?;
    if let Err(e) = made {
        let _ = keel_reclaim::remove(&dest);
        return Err(Status::internal(format!("etcdserver: snapshot: {e:#}")));
    }
    Ok(dest)
}

/// Removes the temporary snapshot file when the stream ends, however it ends.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        // A backend's worth of bytes: given back in steps (keel_reclaim).
        let _ = keel_reclaim::remove(&self.0);
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let s = &self.server;
        let r = req.into_inner();
        if r.action != alarm_request::AlarmAction::Get as i32 {
            s.not_learner().map_err(crate::errors::status)?;
        }
        match s.propose(Internal::Alarm(r)).await.map_err(crate::errors::status)? {
            (Applied::Alarm(alarms), rev) => Ok(Response::new(AlarmResponse { header: s.header(rev), alarms })),
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.server;
        let (rev, db_size, in_use) = {
            let store = s.store();
            (store.current_rev(), store.db_size(), store.db_size_in_use())
        };
        let st = s.raft();
        let is_learner = s.members().get(s.member_id()).map(|m| m.is_learner).unwrap_or(false);
        let mut errors = Vec::new();
        if st.leader() == 0 {
            errors.push("etcdserver: no leader".to_string());
        }
        for a in s.alarms().get(AlarmType::None as i32) {
            let name = AlarmType::try_from(a.alarm).map(|t| t.as_str_name()).unwrap_or("NONE");
            errors.push(format!("memberID:{} alarm:{} ", a.member_id, name));
        }
        Ok(Response::new(StatusResponse {
            header: s.header(rev),
            version: ETCD_VERSION.to_string(),
            db_size: db_size as i64,
            leader: st.leader(),
            raft_index: st.commit(),
            raft_term: st.term(),
            raft_applied_index: st.applied(),
            errors,
            db_size_in_use: in_use.min(db_size) as i64,
            is_learner,
            storage_version: s.storage_version().unwrap_or_default(),
            db_size_quota: s.cfg().quota_backend_bytes_reported(),
            downgrade_info: Some({
                let d = s.downgrade();
                DowngradeInfo { enabled: d.enabled, target_version: d.target_version }
            }),
        }))
    }

    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        // The defragment runs to its end on a task of its own, as etcd's does whatever its
        // caller does: a caller that goes away (a deadline, a closed connection) would otherwise
        // drop it half way, leaving the store remembering every commit for a copy that is never
        // swapped in, and every later defragment refused as already running.
        let server = self.server.clone();
        let done = tokio::spawn(async move {
            let m = &keel_metrics::METRICS;
            m.defrag_inflight.set(1);
            let t0 = std::time::Instant::now();
            let done = server.defragment().await;
            m.defrag_inflight.set(0);
            m.backend_defrag.observe(t0.elapsed().as_secs_f64());
            done
        })
        .await
        .map_err(|e| Status::internal(format!("defragment task failed: {e}")))?;
        done.map_err(backend_err)?;
        // etcd 3.6 answers without a header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let s = &self.server;
        s.check_admin(&crate::api::caller(s, &req)?).map_err(crate::errors::status)?;
        let backend = s.committed_backend().map_err(backend_err)?;
        let t0 = std::time::Instant::now();
        let (hash, meta) =
            tokio::task::spawn_blocking(move || backend.hash()).await.map_err(|e| Status::internal(e.to_string()))?.map_err(backend_err)?;
        keel_metrics::METRICS.hash.observe(t0.elapsed().as_secs_f64());
        Ok(Response::new(HashResponse { header: s.header(meta.current_rev), hash }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        let rev = req.into_inner().revision;
        // Planned under the store's read lock (an index walk), the backend scanned without it.
        let plan = self.server.store().plan_hash_kv(rev).map_err(errors::kv)?;
        let hash_revision = plan.revision();
        let t0 = std::time::Instant::now();
        let (hash, cur, compacted) =
            tokio::task::spawn_blocking(move || plan.run()).await.map_err(|e| Status::internal(e.to_string()))?.map_err(errors::kv)?;
        keel_metrics::METRICS.hash_rev.observe(t0.elapsed().as_secs_f64());
        let compact_revision = keel_server::kv_hash::compact_revision(compacted);
        Ok(Response::new(HashKvResponse { header: self.server.header(cur), hash, compact_revision, hash_revision }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let s = &self.server;
        s.check_admin(&crate::api::caller(s, &req)?).map_err(crate::errors::status)?;
        let t0 = std::time::Instant::now();
        // The storage version the copy is marked with (it follows the cluster version).
        let version = s.storage_version().unwrap_or_default();
        let path = backend_copy(s).await?;
        keel_metrics::METRICS.backend_snapshot.observe(t0.elapsed().as_secs_f64());
        let tmp = TempFile(path);
        let mut file = std::fs::File::open(&tmp.0).map_err(|e| Status::internal(format!("etcdserver: open snapshot: {e}")))?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<SnapshotResponse, Status>>(4);
        tracing::info!(size = total, "sending database snapshot to client");
        tokio::task::spawn_blocking(move || {
            let _tmp = tmp;
            let mut sha = sha2::Sha256::new();
            let mut sent = 0u64;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!("etcdserver: read snapshot: {e}"))));
                        return;
                    }
                };
                sha.update(&buf[..n]);
                sent += n as u64;
                let msg = SnapshotResponse {
                    header: None,
                    remaining_bytes: total.saturating_sub(sent),
                    blob: buf[..n].to_vec(),
                    version: version.clone(),
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return;
                }
            }
            // The last message carries the sha256 of everything before it.
            let msg = SnapshotResponse { header: None, remaining_bytes: 0, blob: sha.finalize().to_vec(), version };
            let _ = tx.blocking_send(Ok(msg));
            tracing::info!(size = sent, "sent database snapshot to client");
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    /// Not limited to root, as in etcd: any client may ask the leader to hand over.
    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        let s = &self.server;
        if !s.raft().is_leader() {
            return Err(errors::not_leader());
        }
        match s.members().get(target) {
            Some(m) if !m.is_learner => {}
            _ => return Err(errors::bad_transferee()),
        }
        if target != s.member_id() {
            s.transfer_leader(target).map_err(crate::errors::status)?;
            let deadline = tokio::time::Instant::now() + s.cfg().request_timeout();
            while s.raft().leader() != target {
                if tokio::time::Instant::now() >= deadline {
                    return Err(errors::timeout());
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            tracing::info!(transferee = format!("{target:x}"), "leadership transferred");
        }
        // etcd 3.6 answers without a header.
        Ok(Response::new(MoveLeaderResponse { header: None }))
    }

    /// etcd 3.6's Downgrade. VALIDATE: the target (major.minor[.patch]) must be one minor
    /// release below the applied cluster version, read linearizably, with no downgrade already
    /// enabled. ENABLE: the same checks, then etcd's `DowngradeInfoSet` entry; the leader then
    /// lowers the cluster version to the target ([`keel_server::cluster_version`]), so that etcd
    /// members of that release can join, and cancels the downgrade once every member runs it.
    /// CANCEL: a `DowngradeInfoSet` that disables it; with none enabled, etcd's warning and an
    /// answer all the same.
    async fn downgrade(&self, req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        let s = &self.server;
        s.check_admin(&crate::api::caller(s, &req)?).map_err(crate::errors::status)?;
        let r = req.into_inner();
        let cluster = |s: &keel_server::server::Server| s.cluster_version().map(|v| format!("{}.{}", v.major, v.minor));
        use downgrade_request::DowngradeAction;
        let action = DowngradeAction::try_from(r.action).map_err(|_| Status::unimplemented("etcdserver: unknown method"))?;
        if action == DowngradeAction::Cancel {
            s.linearizable_barrier().await.map_err(crate::errors::status)?;
            if s.downgrade().enabled {
                let cancel = Internal::DowngradeInfoSet(DowngradeInfoSetRequest { enabled: false, ver: String::new() });
                s.propose(cancel).await.map_err(crate::errors::status)?;
            } else {
                tracing::warn!(error = "etcdserver: no inflight downgrade job", "failed to cancel downgrade");
            }
            let header = s.header(s.store().current_rev());
            return Ok(Response::new(DowngradeResponse { header, version: cluster(s).unwrap_or_default() }));
        }
        let enable = action == DowngradeAction::Enable;
        let refuse = |e: Status| {
            if enable {
                tracing::warn!(error = %e.message(), "reject downgrade request");
            }
            e
        };
        let (major, minor) = downgrade_target(&r.version).ok_or_else(|| refuse(errors::wrong_downgrade_version_format()))?;
        if s.cluster_version().is_none() {
            return Err(refuse(errors::cluster_version_unavailable()));
        }
        s.linearizable_barrier().await.map_err(crate::errors::status)?;
        let cv = s.cluster_version().ok_or_else(|| refuse(errors::cluster_version_unavailable()))?;
        let target = semver::Version::new(major, minor, 0);
        if !keel_server::cluster_version::is_valid_downgrade(&cv, &target) {
            return Err(refuse(errors::invalid_downgrade_target_version()));
        }
        if s.downgrade().enabled {
            return Err(refuse(errors::downgrade_in_process()));
        }
        if enable {
            let set = Internal::DowngradeInfoSet(DowngradeInfoSetRequest { enabled: true, ver: target.to_string() });
            s.propose(set).await.map_err(crate::errors::status)?;
        }
        let header = s.header(s.store().current_rev());
        Ok(Response::new(DowngradeResponse { header, version: cluster(s).unwrap_or_default() }))
    }
}

/// A downgrade target as etcd reads it: `major.minor.patch` or `major.minor`; only major.minor
/// counts.
fn downgrade_target(v: &str) -> Option<(u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let parts: Vec<&str> = core.split('.').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    Some((parts[0].parse().ok()?, parts[1].parse().ok()?))
}

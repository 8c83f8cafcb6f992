//! etcdserverpb.Maintenance: Status, Alarm, Defragment, Hash, HashKV, Snapshot, MoveLeader.
//!
//! Defragment rewrites the backend into a compact copy while requests keep flowing (only the
//! final swap holds the store); Snapshot streams such a copy followed by its sha256, as etcd.

use crate::errors;
use keel_config::{ETCD_STORAGE_VERSION, ETCD_VERSION};
use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::internal_raft_request::Request as Internal;
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
    let made = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let f = std::fs::File::create(&d)?;
        keel_migrate::backend::export(&backend, f, keel_config::ETCD_CLUSTER_VERSION, ETCD_STORAGE_VERSION)?;
        Ok(())
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&dest);
        return Err(Status::internal(format!("etcdserver: snapshot: {e:#}")));
    }
    Ok(dest)
}

/// Removes the temporary snapshot file when the stream ends, however it ends.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
            (store.current_rev(), store.db_size(), store.data_size())
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
            storage_version: ETCD_STORAGE_VERSION.to_string(),
            db_size_quota: s.cfg().quota_backend_bytes_reported(),
            // Keel has no downgrade to offer (see `downgrade`): never enabled.
            downgrade_info: Some(DowngradeInfo { enabled: false, target_version: String::new() }),
        }))
    }

    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        let m = &keel_metrics::METRICS;
        m.defrag_inflight.set(1);
        let t0 = std::time::Instant::now();
        let done = self.server.defragment().await;
        m.defrag_inflight.set(0);
        m.backend_defrag.observe(t0.elapsed().as_secs_f64());
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
        // etcd reports -1 for a store that was never compacted.
        let compact_revision = if compacted == 0 { -1 } else { compacted };
        Ok(Response::new(HashKvResponse { header: self.server.header(cur), hash, compact_revision, hash_revision }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let s = &self.server;
        s.check_admin(&crate::api::caller(s, &req)?).map_err(crate::errors::status)?;
        let t0 = std::time::Instant::now();
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
                    version: ETCD_STORAGE_VERSION.into(),
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return;
                }
            }
            // The last message carries the sha256 of everything before it.
            let msg =
                SnapshotResponse { header: None, remaining_bytes: 0, blob: sha.finalize().to_vec(), version: ETCD_STORAGE_VERSION.into() };
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

    /// etcd 3.6's Downgrade: VALIDATE checks the target (one minor below the cluster version,
    /// as etcd allows); ENABLE is refused after the same checks, since no etcd 3.5 member can
    /// join a Keel cluster (the way back to etcd is a snapshot, see the README); CANCEL has no
    /// downgrade to cancel and, as etcd's, succeeds.
    async fn downgrade(&self, req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        let s = &self.server;
        s.check_admin(&crate::api::caller(s, &req)?).map_err(crate::errors::status)?;
        let r = req.into_inner();
        let cluster: Vec<&str> = keel_config::ETCD_CLUSTER_VERSION.split('.').take(2).collect();
        let version = cluster.join(".");
        let header = s.header(s.store().current_rev());
        use downgrade_request::DowngradeAction;
        match DowngradeAction::try_from(r.action) {
            Ok(DowngradeAction::Cancel) => {
                tracing::warn!("failed to cancel downgrade: etcdserver: no inflight downgrade job");
                return Ok(Response::new(DowngradeResponse { header, version }));
            }
            Ok(DowngradeAction::Validate | DowngradeAction::Enable) => {}
            Err(_) => return Err(Status::unimplemented("etcdserver: unknown method")),
        }
        let target = downgrade_target(&r.version).ok_or_else(errors::wrong_downgrade_version_format)?;
        let (major, minor): (u64, u64) = (cluster[0].parse().unwrap_or(3), cluster[1].parse().unwrap_or(6));
        if minor == 0 || target != (major, minor - 1) {
            return Err(errors::invalid_downgrade_target_version());
        }
        s.linearizable_barrier().await.map_err(crate::errors::status)?;
        if r.action == DowngradeAction::Enable as i32 {
            tracing::warn!(target_version = %r.version, "reject downgrade request: Keel cannot run etcd 3.5 members");
            return Err(Status::failed_precondition(
                "etcdserver: downgrade is not supported by Keel; move to etcd 3.5 through a snapshot (etcdutl snapshot restore)",
            ));
        }
        Ok(Response::new(DowngradeResponse { header, version }))
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

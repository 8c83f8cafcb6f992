//! etcdserverpb.Maintenance: Status and Alarm for now; the rest comes with the operations issue.

use crate::config::ETCD_VERSION;
use crate::errors;
use crate::server::Server;
use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::*;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct MaintenanceService {
    pub server: Arc<Server>,
}

type SnapshotStream = Pin<Box<dyn futures::Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, _req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let rev = self.server.store().current_rev();
        Ok(Response::new(AlarmResponse { header: self.server.header(rev), alarms: vec![] }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.server;
        let (rev, (db_size, in_use)) = {
            let store = s.store();
            (store.current_rev(), store.db_size())
        };
        let st = &s.node.status;
        let is_learner = s.members().get(s.member_id).map(|m| m.is_learner).unwrap_or(false);
        Ok(Response::new(StatusResponse {
            header: s.header(rev),
            version: ETCD_VERSION.to_string(),
            db_size: db_size as i64,
            leader: st.leader(),
            raft_index: st.commit(),
            raft_term: st.term(),
            raft_applied_index: st.applied(),
            errors: vec![],
            db_size_in_use: in_use as i64,
            is_learner,
        }))
    }

    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req)?)?;
        Err(Status::unimplemented("etcdserver: defragment is not implemented yet"))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req)?)?;
        Err(Status::unimplemented("etcdserver: hash is not implemented yet"))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req)?)?;
        let rev = req.into_inner().revision;
        let (hash, cur, compacted) = self.server.store().hash_kv(rev).map_err(errors::kv)?;
        Ok(Response::new(HashKvResponse { header: self.server.header(cur), hash, compact_revision: compacted }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.server.check_admin(&self.server.caller(&req)?)?;
        Err(Status::unimplemented("etcdserver: snapshot is not implemented yet"))
    }

    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req)?)?;
        let target = req.into_inner().target_id;
        let s = &self.server;
        if !s.node.status.is_leader.load(std::sync::atomic::Ordering::Acquire) {
            return Err(errors::not_leader());
        }
        match s.members().get(target) {
            Some(m) if !m.is_learner => {}
            _ => return Err(errors::bad_transferee()),
        }
        if target != s.member_id {
            s.node.transfer_leader(target).map_err(errors::propose)?;
            let deadline = tokio::time::Instant::now() + s.cfg.request_timeout();
            while s.node.status.leader() != target {
                if tokio::time::Instant::now() >= deadline {
                    return Err(errors::timeout());
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            tracing::info!(transferee = format!("{target:x}"), "leadership transferred");
        }
        let rev = s.store().current_rev();
        Ok(Response::new(MoveLeaderResponse { header: s.header(rev) }))
    }

    async fn downgrade(&self, _req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        Err(Status::unimplemented("etcdserver: downgrade is not implemented"))
    }
}

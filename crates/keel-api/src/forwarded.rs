//! What another member forwards to this one over the peer service (the requests only the leader
//! can answer), answered by the server: the peer transport knows nothing of the client API.
//! Calls the server and the lease duties.

use keel_proto::etcdserverpb::{LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, MemberPromoteResponse};
use keel_server::server::Server;
use std::sync::Arc;
use tonic::Status;

/// This member, as the leader its followers forward to.
pub struct Leader(pub Arc<Server>);

#[tonic::async_trait]
impl keel_server::peer::Forwarded for Leader {
    async fn promote(&self, id: u64) -> Result<MemberPromoteResponse, Status> {
        let members = self.0.promote_learner(id).await.map_err(crate::errors::status)?;
        Ok(MemberPromoteResponse { header: self.0.header(0), members })
    }

    fn lease_renew(&self, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
        self.leading()?;
        let ttl = keel_server::lease_duties::renew_here(&self.0, id);
        Ok(LeaseKeepAliveResponse { header: self.0.header(self.0.store().current_rev()), id, ttl })
    }

    fn lease_time_to_live(&self, r: &LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, Status> {
        self.leading()?;
        Ok(keel_server::lease_duties::local_time_to_live(&self.0, r))
    }
}

impl Leader {
    /// Only the leader answers what followers forward (a follower that still thinks this member
    /// leads retries elsewhere).
    fn leading(&self) -> Result<(), Status> {
        if self.0.raft().is_leader() {
            Ok(())
        } else {
            Err(Status::unavailable("etcdserver: not leader"))
        }
    }
}

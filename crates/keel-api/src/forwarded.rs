//! The lease answers followers forward to this member over the peer URLs (only the leader's
//! lessor knows a lease's deadline), given by the server: the peer protocol knows nothing of
//! the lessor. Calls the server and the lease duties.

use keel_proto::etcdserverpb::{LeaseTimeToLiveRequest, LeaseTimeToLiveResponse};
use keel_server::rafthttp::NotPrimary;
use keel_server::server::Server;
use std::sync::Arc;

/// This member, as the leader its followers forward to.
pub struct Leader(pub Arc<Server>);

impl keel_server::rafthttp::Forwarded for Leader {
    fn lease_renew(&self, id: i64) -> futures::future::BoxFuture<'_, Result<Option<i64>, NotPrimary>> {
        Box::pin(async move {
            self.leading()?;
            // A renewal that cannot wait for this member's apply (it lost the lead, or timed
            // out) is refused as by a member that does not lead: the follower tries again.
            let ttl = keel_server::lease_duties::renew_leading(&self.0, id).await.map_err(|_| NotPrimary)?;
            Ok((ttl > 0).then_some(ttl))
        })
    }

    fn lease_time_to_live(&self, r: &LeaseTimeToLiveRequest) -> Result<Option<LeaseTimeToLiveResponse>, NotPrimary> {
        self.leading()?;
        let resp = keel_server::lease_duties::local_time_to_live(&self.0, r);
        Ok((resp.ttl != -1).then_some(resp))
    }
}

impl Leader {
    /// Only the leader's lessor is primary (a follower that still thinks this member leads
    /// retries elsewhere).
    fn leading(&self) -> Result<(), NotPrimary> {
        if self.0.raft().is_leader() {
            Ok(())
        } else {
            Err(NotPrimary)
        }
    }
}

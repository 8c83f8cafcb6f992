//! etcdserverpb.Lease: grant and revoke through raft; keep-alive and TTL queries answered by the
//! leader (a follower forwards them over the peer link), as etcd does.

use crate::apply::Applied;
use crate::errors;
use crate::lease::MAX_TTL;
use crate::peer::PeerTransport;
use crate::server::Server;
use keel_proto::etcdserverpb::lease_server::Lease;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::internal_request::Request as Internal;
use keel_proto::keelpb::{LeaseCheckpoints, LeaseRemaining};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct LeaseService {
    pub server: Arc<Server>,
    pub transport: PeerTransport,
}

/// Keep-alive on this member if it leads, else on the leader.
pub async fn renew(server: &Server, transport: &PeerTransport, id: i64) -> Result<i64, Status> {
    if server.node.status.is_leader.load(Ordering::Acquire) {
        let ttl = server.lessor().renew(id).unwrap_or(0);
        if ttl > 0 {
            checkpoint_renewal(server, id, ttl);
        }
        return Ok(ttl);
    }
    let leader = server.node.status.leader();
    if leader == 0 {
        return Err(errors::no_leader());
    }
    transport.forward_lease_renew(leader, id).await
}

/// Records a renewal through raft at once, so that a leader elected before the next periodic
/// checkpoint does not expire the lease early.
pub fn checkpoint_renewal(server: &Server, id: i64, ttl: i64) {
    let Some(s) = server.me.upgrade() else { return };
    tokio::spawn(async move {
        let leases = vec![LeaseRemaining { id, remaining_ms: ttl * 1000 }];
        let _ = s.propose(Internal::LeaseCheckpoint(LeaseCheckpoints { leases })).await;
    });
}

/// TTL query on this member if it leads, else on the leader.
pub async fn time_to_live(
    server: &Server,
    transport: &PeerTransport,
    r: LeaseTimeToLiveRequest,
) -> Result<LeaseTimeToLiveResponse, Status> {
    if server.node.status.is_leader.load(Ordering::Acquire) {
        return Ok(local_time_to_live(server, &r));
    }
    let leader = server.node.status.leader();
    if leader == 0 {
        return Err(errors::no_leader());
    }
    transport.forward_lease_ttl(leader, r).await
}

/// The leader's answer to a TTL query; TTL -1 for a lease that does not exist.
pub fn local_time_to_live(server: &Server, r: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
    let rev = server.store().current_rev();
    match server.lessor().time_to_live(r.id) {
        Some((ttl, granted, keys)) => LeaseTimeToLiveResponse {
            header: server.header(rev),
            id: r.id,
            ttl,
            granted_ttl: granted,
            keys: if r.keys { keys } else { vec![] },
        },
        None => LeaseTimeToLiveResponse { header: server.header(rev), id: r.id, ttl: -1, granted_ttl: 0, keys: vec![] },
    }
}

type KeepAliveStream = Pin<Box<dyn futures::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let s = &self.server;
        let who = s.caller(&req)?;
        let mut r = req.into_inner();
        s.not_learner()?;
        if r.ttl > MAX_TTL {
            return Err(errors::lease_ttl_too_large());
        }
        r.ttl = r.ttl.max(s.min_lease_ttl());
        if r.id == 0 {
            r.id = s.new_lease_id();
        }
        // etcd's lease overhead estimate.
        s.check_quota(64).await?;
        match s.propose_as(Internal::LeaseGrant(r), &who).await? {
            (Applied::LeaseGrant(mut resp), rev) => {
                resp.header = s.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let s = &self.server;
        let who = s.caller(&req)?;
        let r = req.into_inner();
        s.not_learner()?;
        match s.propose_as(Internal::LeaseRevoke(r), &who).await? {
            (Applied::LeaseRevoke(mut resp), rev) => {
                resp.header = s.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let server = self.server.clone();
        let transport = self.transport.clone();
        tokio::spawn(async move {
            loop {
                let r = match input.message().await {
                    Ok(Some(r)) => r,
                    _ => return,
                };
                let resp = match renew(&server, &transport, r.id).await {
                    Ok(ttl) => {
                        let rev = server.store().current_rev();
                        Ok(LeaseKeepAliveResponse { header: server.header(rev), id: r.id, ttl })
                    }
                    Err(e) => Err(e),
                };
                let stop = resp.is_err();
                if tx.send(resp).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(&self, req: Request<LeaseTimeToLiveRequest>) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(time_to_live(&self.server, &self.transport, req.into_inner()).await?))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let s = &self.server;
        let leases = s.lessor().ids().into_iter().map(|id| LeaseStatus { id }).collect();
        let rev = s.store().current_rev();
        Ok(Response::new(LeaseLeasesResponse { header: s.header(rev), leases }))
    }
}

/// The leader's duties for leases: follow leadership (promote/demote the lessor) and revoke
/// leases whose deadline passed, through raft.
pub async fn run_expiry(server: Arc<Server>) {
    let mut was_leader = false;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    let election = std::time::Duration::from_millis(server.cfg.election_timeout);
    let mut last_checkpoint = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let leader = server.node.status.is_leader.load(Ordering::Acquire);
        if leader != was_leader {
            if leader {
                server.lessor().promote(election);
            } else {
                server.lessor().demote();
            }
            was_leader = leader;
        }
        if !leader {
            continue;
        }
        // Checkpoint remaining TTLs about once per election timeout (batched).
        if last_checkpoint.elapsed() >= election {
            last_checkpoint = tokio::time::Instant::now();
            let due = server.lessor().due_checkpoints(1000);
            if !due.is_empty() {
                let leases = due.into_iter().map(|(id, remaining_ms)| LeaseRemaining { id, remaining_ms }).collect();
                let s = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = s.propose(Internal::LeaseCheckpoint(LeaseCheckpoints { leases })).await {
                        tracing::debug!(error = %e.message(), "lease checkpoint failed; the next one will carry it");
                    }
                });
            }
        }
        // etcd revokes at most 1000 leases per second.
        let expired = server.lessor().take_expired(100, std::time::Duration::from_secs(3));
        for id in expired {
            let s = server.clone();
            tokio::spawn(async move {
                if let Err(e) = s.propose(Internal::LeaseRevoke(LeaseRevokeRequest { id })).await {
                    if e.code() != tonic::Code::NotFound {
                        tracing::warn!(lease = format!("{id:x}"), error = %e.message(), "failed to revoke an expired lease; will retry");
                    }
                }
            });
        }
    }
}

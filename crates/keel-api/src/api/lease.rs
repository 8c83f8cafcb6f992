//! etcdserverpb.Lease: grant and revoke through raft; keep-alive and TTL queries answered by the
//! leader (a follower forwards them over the peer link), as etcd does ([`keel_lease`]).

use crate::errors;
use keel_lease::MAX_TTL;
use keel_proto::etcdserverpb::lease_server::Lease;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::internal_raft_request::Request as Internal;
use keel_server::apply::Applied;
use keel_server::lease_duties::{renew, time_to_live};
use keel_server::rafthttp::Transport;
use keel_server::server::Server;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub struct LeaseService {
    pub server: Arc<Server>,
    pub transport: Transport,
}

type KeepAliveStream = Pin<Box<dyn futures::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let s = &self.server;
        let who = crate::api::caller(s, &req)?;
        let mut r = req.into_inner();
        s.not_learner().map_err(crate::errors::status)?;
        if r.ttl > MAX_TTL {
            return Err(errors::lease_ttl_too_large());
        }
        r.ttl = r.ttl.max(s.min_lease_ttl());
        if r.id == 0 {
            r.id = s.new_lease_id();
        }
        // etcd's lease overhead estimate.
        s.check_quota(64).await.map_err(crate::errors::status)?;
        match s.propose_as(Internal::LeaseGrant(r), &who).await.map_err(crate::errors::status)? {
            (Applied::LeaseGrant(mut resp), rev) => {
                resp.header = s.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let s = &self.server;
        let who = crate::api::caller(s, &req)?;
        let r = req.into_inner();
        s.not_learner().map_err(crate::errors::status)?;
        match s.propose_as(Internal::LeaseRevoke(r), &who).await.map_err(crate::errors::status)? {
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
                    Err(e) => Err(crate::errors::status(e)),
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
        Ok(Response::new(time_to_live(&self.server, &self.transport, req.into_inner()).await.map_err(crate::errors::status)?))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let s = &self.server;
        let leases = s.lessor().ids().into_iter().map(|id| LeaseStatus { id }).collect();
        let rev = s.store().current_rev();
        Ok(Response::new(LeaseLeasesResponse { header: s.header(rev), leases }))
    }
}

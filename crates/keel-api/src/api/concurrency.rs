//! v3lockpb.Lock and v3electionpb.Election, built as etcd builds them: on keys under the lock or
//! election name, one per lease (`<name>/<lease hex>`), ordered by create revision, and waiting
//! for the deletion of every earlier key with a watch. A request without a lease gets a session
//! lease, as etcd's servers make one: granted with a 60 s TTL and kept alive while the call waits
//! (then left to expire).

use crate::errors;
use keel_auth::AuthInfo;
use keel_mvcc::kv as mvcc_kv;
use keel_mvcc::watch::{Spec, WatchHub};
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::{
    request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use keel_proto::keelpb::internal_raft_request::Request as Internal;
use keel_proto::mvccpb::{event::EventType, KeyValue};
use keel_proto::v3electionpb::election_server::Election;
use keel_proto::v3electionpb::*;
use keel_proto::v3lockpb::lock_server::Lock;
use keel_proto::v3lockpb::*;
use keel_server::apply::Applied;
use keel_server::server::Server;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Concurrency {
    pub server: Arc<Server>,
    pub hub: Arc<WatchHub>,
    pub transport: keel_server::rafthttp::Transport,
}

/// The TTL of the session lease made for a request without one (clientv3 concurrency's default).
const SESSION_TTL: i64 = 60;

/// Keeps a session lease alive until dropped (the call finished or was cancelled).
struct KeepAlive(Option<tokio::task::JoinHandle<()>>);

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0]
}

fn op(r: request_op::Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        range_end: vec![],
        target_union: Some(TargetUnion::CreateRevision(rev)),
    }
}

/// etcd's election and lock servers call the KV through an in-process client, whose errors
/// reach the caller with code Unknown and the server's message: so do Keel's.
fn as_client_error(e: keel_server::error::Error) -> Status {
    Status::unknown(crate::errors::status(e).message().to_string())
}

impl Concurrency {
    /// The lease a lock or campaign is held with: the request's, or a new session lease kept
    /// alive by the returned guard (every third of its TTL, as clientv3 does).
    async fn session(&self, lease: i64) -> Result<(i64, KeepAlive), Status> {
        if lease != 0 {
            return Ok((lease, KeepAlive(None)));
        }
        self.server.not_learner().map_err(crate::errors::status)?;
        let req = keel_proto::etcdserverpb::LeaseGrantRequest { ttl: SESSION_TTL, id: self.server.new_lease_id() };
        let id = match self.server.propose(Internal::LeaseGrant(req)).await.map_err(as_client_error)? {
            (Applied::LeaseGrant(r), _) => r.id,
            _ => return Err(Status::internal("etcdserver: unexpected apply result")),
        };
        let (server, transport) = (self.server.clone(), self.transport.clone());
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs((SESSION_TTL / 3) as u64));
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = keel_server::lease_duties::renew(&server, &transport, id).await {
                    tracing::debug!(lease = id, error = %e, "session lease keep-alive failed");
                }
            }
        });
        Ok((id, KeepAlive(Some(task))))
    }

    /// A transaction as `who` (etcd's servers pass the caller's token to the in-process client,
    /// so the apply checks the caller's permissions).
    async fn txn(&self, who: &AuthInfo, t: TxnRequest) -> Result<(TxnResponse, i64), Status> {
        self.server.not_learner().map_err(crate::errors::status)?;
        match self.server.propose_as(Internal::Txn(t), who).await.map_err(as_client_error)? {
            (Applied::Txn(r), rev) => Ok((r, rev)),
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    async fn range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        self.server.linearizable_barrier().await.map_err(crate::errors::status)?;
        mvcc_kv::range(&self.server.store(), &r).map_err(errors::kv)
    }

    /// Puts `key` (with `lease`) unless it exists; returns its create revision and whether it
    /// was there already (with its value).
    async fn claim(&self, who: &AuthInfo, key: &[u8], value: &[u8], lease: i64) -> Result<(i64, Option<KeyValue>, i64), Status> {
        let t = TxnRequest {
            compare: vec![create_rev_is(key, 0)],
            success: vec![op(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                lease,
                ..Default::default()
            }))],
            failure: vec![op(request_op::Request::RequestRange(RangeRequest { key: key.to_vec(), ..Default::default() }))],
        };
        let (resp, rev) = self.txn(who, t).await?;
        if resp.succeeded {
            return Ok((rev, None, rev));
        }
        let kv = match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(response_op::Response::ResponseRange(r)) => r.kvs.into_iter().next(),
            _ => None,
        };
        let kv = kv.ok_or_else(|| Status::unavailable("etcdserver: request timed out"))?;
        Ok((kv.create_revision, Some(kv), rev))
    }

    /// Waits until no key under `prefix` created before `before` is left (etcd's waitDeletes).
    async fn wait_deletes(&self, prefix: &[u8], before: i64) -> Result<(), Status> {
        loop {
            let r = self
                .range(RangeRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    max_create_revision: before - 1,
                    sort_order: SortOrder::Descend as i32,
                    sort_target: SortTarget::Create as i32,
                    limit: 1,
                    ..Default::default()
                })
                .await?;
            let Some(kv) = r.kvs.into_iter().next() else { return Ok(()) };
            let at = r.header.map(|h| h.revision).unwrap_or(0);
            let spec = Spec { key: kv.key.clone(), range_end: vec![], prev_kv: false, no_put: true, no_delete: false, fragment: false };
            let (mut rx, _sub) = self.hub.subscribe(spec, at + 1);
            loop {
                match rx.recv().await {
                    Some(resp) if resp.canceled => break,
                    Some(resp) => {
                        if resp.events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                            break;
                        }
                    }
                    None => return Err(Status::unavailable("etcdserver: server stopped")),
                }
            }
        }
    }

    async fn leader_kv(&self, name: &[u8]) -> Result<(Option<KeyValue>, i64), Status> {
        let pfx = [name, b"/"].concat();
        let r = self
            .range(RangeRequest {
                key: pfx.clone(),
                range_end: prefix_end(&pfx),
                sort_order: SortOrder::Ascend as i32,
                sort_target: SortTarget::Create as i32,
                limit: 1,
                ..Default::default()
            })
            .await?;
        let rev = r.header.map(|h| h.revision).unwrap_or(0);
        Ok((r.kvs.into_iter().next(), rev))
    }
}

/// With auth on, the caller needs the permissions the operation's own reads and writes on
/// `name/...` would need (`write` includes read), as with etcd's client-side implementation.
fn authorize<T>(server: &keel_server::server::Server, req: &Request<T>, name: &[u8], write: bool) -> Result<AuthInfo, Status> {
    let who = crate::api::caller(server, req)?;
    let auth = server.auth();
    let pfx = [name, b"/"].concat();
    let end = prefix_end(&pfx);
    auth.check(&who, &pfx, &end, keel_auth::Perm::Read).map_err(errors::auth)?;
    if write {
        auth.check(&who, &pfx, &end, keel_auth::Perm::Write).map_err(errors::auth)?;
    }
    drop(auth);
    Ok(who)
}

fn lease_key(name: &[u8], lease: i64) -> Vec<u8> {
    [name, b"/", format!("{lease:x}").as_bytes()].concat()
}

#[tonic::async_trait]
impl Lock for Concurrency {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let who = authorize(&self.server, &req, &req.get_ref().name, true)?;
        let mut r = req.into_inner();
        let _alive;
        (r.lease, _alive) = self.session(r.lease).await?;
        let key = lease_key(&r.name, r.lease);
        let (my_rev, _, _) = self.claim(&who, &key, b"", r.lease).await?;
        self.wait_deletes(&[r.name.as_slice(), b"/"].concat(), my_rev).await?;
        // The lease may have expired while waiting: then the lock is not held.
        let still = self.range(RangeRequest { key: key.clone(), ..Default::default() }).await?;
        if still.kvs.is_empty() {
            return Err(Status::unknown("concurrency: session expired"));
        }
        let rev = still.header.map(|h| h.revision).unwrap_or(0);
        Ok(Response::new(LockResponse { header: self.server.header(rev), key }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        self.server.auth().check(&who, &req.get_ref().key, &[], keel_auth::Perm::Write).map_err(errors::auth)?;
        let key = req.into_inner().key;
        self.server.not_learner().map_err(crate::errors::status)?;
        let (_, rev) = self
            .server
            .propose_as(Internal::DeleteRange(DeleteRangeRequest { key, ..Default::default() }), &who)
            .await
            .map_err(crate::errors::status)?;
        Ok(Response::new(UnlockResponse { header: self.server.header(rev) }))
    }
}

type ObserveStream = Pin<Box<dyn futures::Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for Concurrency {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let who = authorize(&self.server, &req, &req.get_ref().name, true)?;
        let mut r = req.into_inner();
        let _alive;
        (r.lease, _alive) = self.session(r.lease).await?;
        let key = lease_key(&r.name, r.lease);
        let (my_rev, existing, _) = self.claim(&who, &key, &r.value, r.lease).await?;
        if let Some(kv) = existing {
            if kv.value != r.value {
                self.proclaim_value(&who, &key, my_rev, r.lease, &r.value).await?;
            }
        }
        self.wait_deletes(&[r.name.as_slice(), b"/"].concat(), my_rev).await?;
        let rev = self.server.store().current_rev();
        let leader = LeaderKey { name: r.name, key, rev: my_rev, lease: r.lease };
        Ok(Response::new(CampaignResponse { header: self.server.header(rev), leader: Some(leader) }))
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let name = req.get_ref().leader.as_ref().map(|l| l.name.clone()).unwrap_or_default();
        let who = authorize(&self.server, &req, &name, true)?;
        let r = req.into_inner();
        let l = r.leader.ok_or_else(|| Status::unknown("\"leader\" field must be provided"))?;
        let rev = self.proclaim_value(&who, &l.key, l.rev, l.lease, &r.value).await?;
        Ok(Response::new(ProclaimResponse { header: self.server.header(rev) }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        authorize(&self.server, &req, &req.get_ref().name, false)?;
        let (kv, rev) = self.leader_kv(&req.into_inner().name).await?;
        let kv = kv.ok_or_else(|| Status::unknown("election: no leader"))?;
        Ok(Response::new(LeaderResponse { header: self.server.header(rev), kv: Some(kv) }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        authorize(&self.server, &req, &req.get_ref().name, false)?;
        let name = req.into_inner().name;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = Concurrency { server: self.server.clone(), hub: self.hub.clone(), transport: self.transport.clone() };
        tokio::spawn(async move {
            let pfx = [name.as_slice(), b"/"].concat();
            let mut last: Option<KeyValue> = None;
            loop {
                let (kv, rev) = match this.leader_kv(&name).await {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if let Some(kv) = &kv {
                    if last.as_ref() != Some(kv) {
                        if tx.send(Ok(LeaderResponse { header: this.server.header(rev), kv: Some(kv.clone()) })).await.is_err() {
                            return;
                        }
                        last = Some(kv.clone());
                    }
                }
                // Wait for any change under the election's prefix.
                let spec = Spec {
                    key: pfx.clone(),
                    range_end: prefix_end(&pfx),
                    prev_kv: false,
                    no_put: false,
                    no_delete: false,
                    fragment: false,
                };
                let (mut events, _sub) = this.hub.subscribe(spec, rev + 1);
                tokio::select! {
                    e = events.recv() => if e.is_none() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let name = req.get_ref().leader.as_ref().map(|l| l.name.clone()).unwrap_or_default();
        let who = authorize(&self.server, &req, &name, true)?;
        let l = req.into_inner().leader.ok_or_else(|| Status::unknown("\"leader\" field must be provided"))?;
        let t = TxnRequest {
            compare: vec![create_rev_is(&l.key, l.rev)],
            success: vec![op(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key: l.key.clone(), ..Default::default() }))],
            failure: vec![],
        };
        let (_, rev) = self.txn(&who, t).await?;
        Ok(Response::new(ResignResponse { header: self.server.header(rev) }))
    }
}

impl Concurrency {
    /// Replaces the leader's value if `key` still holds the leadership of `rev`.
    async fn proclaim_value(&self, who: &AuthInfo, key: &[u8], rev: i64, lease: i64, value: &[u8]) -> Result<i64, Status> {
        let t = TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![op(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                lease,
                ..Default::default()
            }))],
            failure: vec![],
        };
        let (resp, at) = self.txn(who, t).await?;
        if !resp.succeeded {
            return Err(Status::unknown("election: not leader"));
        }
        Ok(at)
    }
}

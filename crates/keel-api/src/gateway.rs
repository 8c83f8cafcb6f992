//! The `/v3/...` JSON gateway on the client port (etcd's grpc-gateway): POST a request message as
//! proto3 JSON (field names as in the .proto files, bytes as base64, 64-bit integers as strings),
//! get the response message back the same way. Errors come as
//! `{"error": msg, "message": msg, "code": grpc-code}`; streams as one `{"result": ...}` per line.
//! `/v3beta/...` is the same. Calls the gRPC services' handlers; owns no state.

use crate::api;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use keel_mvcc::watch::{Spec, WatchHub};
use keel_proto::etcdserverpb::auth_server::Auth;
use keel_proto::etcdserverpb::cluster_server::Cluster;
use keel_proto::etcdserverpb::kv_server::Kv;
use keel_proto::etcdserverpb::lease_server::Lease;
use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::{watch_request::RequestUnion, WatchRequest};
use keel_proto::v3electionpb::election_server::Election;
use keel_proto::v3lockpb::lock_server::Lock;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tonic::Status;

pub struct Gateway {
    pub kv: api::kv::KvService,
    pub lease: api::lease::LeaseService,
    pub cluster: api::cluster::ClusterService,
    pub maintenance: api::maintenance::MaintenanceService,
    pub concurrency: api::concurrency::Concurrency,
    pub auth: api::auth::AuthService,
    pub hub: Arc<WatchHub>,
    /// Watch stream ids for gateway watches (kept apart from the gRPC service's).
    pub next_stream: AtomicU64,
    /// `--max-concurrent-streams` across all gateway calls: etcd's gateway is a client of the
    /// gRPC server over one connection, so a call waits while that many are in flight.
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// The largest JSON body the gateway reads for requests of at most `max_request_bytes`: bytes
/// fields come base64-encoded (4 bytes per 3) inside JSON, plus room for the rest of the request
/// (as gRPC's receive limit leaves etcd's 512 KiB overhead). Larger requests then get etcd's
/// "request is too large" from the request checks, not an HTTP 413.
pub fn body_limit(max_request_bytes: usize) -> usize {
    max_request_bytes.saturating_mul(4).div_ceil(3).saturating_add(1 << 20)
}

pub fn router(gw: Arc<Gateway>, max_request_bytes: usize) -> Router {
    Router::new()
        .route("/v3/{*path}", post(handle))
        .route("/v3beta/{*path}", post(handle))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit(max_request_bytes)))
        .with_state(gw)
}

fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::REQUEST_TIMEOUT,
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(s: Status) -> Response {
    // Field order as etcd's gateway writes it.
    let msg = serde_json::Value::String(s.message().to_string()).to_string();
    let body = format!("{{\"error\":{msg},\"message\":{msg},\"code\":{}}}", s.code() as i32);
    (http_status(s.code()), [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn parse<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, Status> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// The caller's token: etcd's gateway passes the `Authorization` header on as request metadata.
type Token = Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;

fn with_token<T>(msg: T, token: &Token) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("token", t.clone());
    }
    r
}

async fn unary<Req, Resp, F, Fut>(body: Bytes, token: &Token, f: F) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req = match parse::<Req>(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match f(with_token(req, token)).await {
        Ok(resp) => match serde_json::to_string(resp.get_ref()) {
            Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
            Err(e) => error(Status::internal(e.to_string())),
        },
        Err(e) => error(e),
    }
}

async fn handle(State(gw): State<Arc<Gateway>>, Path(path): Path<String>, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    let g = &*gw;
    let Ok(permit) = g.streams.clone().acquire_owned().await else {
        return error(Status::unavailable("etcdserver: server stopped"));
    };
    let token: Token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let t = &token;
    match path.trim_end_matches('/') {
        "kv/range" => unary(body, t, |r| g.kv.range(r)).await,
        "kv/put" => unary(body, t, |r| g.kv.put(r)).await,
        "kv/deleterange" => unary(body, t, |r| g.kv.delete_range(r)).await,
        "kv/txn" => unary(body, t, |r| g.kv.txn(r)).await,
        "kv/compaction" => unary(body, t, |r| g.kv.compact(r)).await,
        "lease/grant" => unary(body, t, |r| g.lease.lease_grant(r)).await,
        "lease/revoke" | "kv/lease/revoke" => unary(body, t, |r| g.lease.lease_revoke(r)).await,
        "lease/timetolive" | "kv/lease/timetolive" => unary(body, t, |r| g.lease.lease_time_to_live(r)).await,
        "lease/leases" | "kv/lease/leases" => unary(body, t, |r| g.lease.lease_leases(r)).await,
        "lease/keepalive" => keep_alive(g, body).await,
        "auth/enable" => unary(body, t, |r| g.auth.auth_enable(r)).await,
        "auth/disable" => unary(body, t, |r| g.auth.auth_disable(r)).await,
        "auth/status" => unary(body, t, |r| g.auth.auth_status(r)).await,
        "auth/authenticate" => unary(body, t, |r| g.auth.authenticate(r)).await,
        "auth/user/add" => unary(body, t, |r| g.auth.user_add(r)).await,
        "auth/user/get" => unary(body, t, |r| g.auth.user_get(r)).await,
        "auth/user/list" => unary(body, t, |r| g.auth.user_list(r)).await,
        "auth/user/delete" => unary(body, t, |r| g.auth.user_delete(r)).await,
        "auth/user/changepw" => unary(body, t, |r| g.auth.user_change_password(r)).await,
        "auth/user/grant" => unary(body, t, |r| g.auth.user_grant_role(r)).await,
        "auth/user/revoke" => unary(body, t, |r| g.auth.user_revoke_role(r)).await,
        "auth/role/add" => unary(body, t, |r| g.auth.role_add(r)).await,
        "auth/role/get" => unary(body, t, |r| g.auth.role_get(r)).await,
        "auth/role/list" => unary(body, t, |r| g.auth.role_list(r)).await,
        "auth/role/delete" => unary(body, t, |r| g.auth.role_delete(r)).await,
        "auth/role/grant" => unary(body, t, |r| g.auth.role_grant_permission(r)).await,
        "auth/role/revoke" => unary(body, t, |r| g.auth.role_revoke_permission(r)).await,
        "cluster/member/add" => unary(body, t, |r| g.cluster.member_add(r)).await,
        "cluster/member/remove" => unary(body, t, |r| g.cluster.member_remove(r)).await,
        "cluster/member/update" => unary(body, t, |r| g.cluster.member_update(r)).await,
        "cluster/member/list" => unary(body, t, |r| g.cluster.member_list(r)).await,
        "cluster/member/promote" => unary(body, t, |r| g.cluster.member_promote(r)).await,
        "maintenance/alarm" => unary(body, t, |r| g.maintenance.alarm(r)).await,
        "maintenance/status" => unary(body, t, |r| g.maintenance.status(r)).await,
        "maintenance/defragment" => unary(body, t, |r| g.maintenance.defragment(r)).await,
        "maintenance/hash" => unary(body, t, |r| g.maintenance.hash(r)).await,
        "maintenance/hashkv" => unary(body, t, |r| g.maintenance.hash_kv(r)).await,
        "maintenance/transfer-leadership" => unary(body, t, |r| g.maintenance.move_leader(r)).await,
        "maintenance/downgrade" => unary(body, t, |r| g.maintenance.downgrade(r)).await,
        "election/campaign" => unary(body, t, |r| g.concurrency.campaign(r)).await,
        "election/proclaim" => unary(body, t, |r| g.concurrency.proclaim(r)).await,
        "election/leader" => unary(body, t, |r| g.concurrency.leader(r)).await,
        "election/observe" => server_stream(body, t, permit, |r| g.concurrency.observe(r)).await,
        "maintenance/snapshot" => server_stream(body, t, permit, |r| g.maintenance.snapshot(r)).await,
        "election/resign" => unary(body, t, |r| g.concurrency.resign(r)).await,
        "lock/lock" => unary(body, t, |r| g.concurrency.lock(r)).await,
        "lock/unlock" => unary(body, t, |r| g.concurrency.unlock(r)).await,
        "watch" => watch(g, body, t, permit).await,
        _ => error(Status::unimplemented(format!("etcdserver: gateway has no route /v3/{path}"))),
    }
}

/// `{"result":...}` and a newline, the message's fields in proto order as etcd's gateway writes
/// them (a `serde_json::Value` would sort them).
fn result_line<T: Serialize>(msg: &T) -> Bytes {
    let inner = serde_json::to_string(msg).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("{{\"result\":{inner}}}\n"))
}

/// A server-streaming call: each message the handler streams becomes one `{"result":...}` line;
/// an error ending the stream becomes an `{"error":...}` line, as etcd's gateway writes it.
async fn server_stream<Req, Resp, S, F, Fut>(body: Bytes, token: &Token, permit: tokio::sync::OwnedSemaphorePermit, f: F) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize + Send + 'static,
    S: futures::Stream<Item = Result<Resp, Status>> + Send + Unpin + 'static,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    let req: Req = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let mut messages = match f(with_token(req, token)).await {
        Ok(r) => r.into_inner(),
        Err(e) => return error(e),
    };
    let stream = async_stream(move |out: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
        use futures::StreamExt;
        let _permit = permit;
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                _ = out.closed() => None,
            };
            let line = match next {
                None => break,
                Some(Ok(m)) => result_line(&m),
                Some(Err(s)) => {
                    let msg = serde_json::Value::String(s.message().to_string());
                    Bytes::from(format!("{{\"error\":{{\"code\":{},\"message\":{msg}}}}}\n", s.code() as i32))
                }
            };
            if out.send(Ok(line)).await.is_err() {
                break;
            }
        }
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}

/// One keep-alive: the answer comes wrapped as a stream result, as etcd's gateway does.
async fn keep_alive(g: &Gateway, body: Bytes) -> Response {
    let req: keel_proto::etcdserverpb::LeaseKeepAliveRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match keel_server::lease_duties::renew(&g.lease.server, &g.lease.transport, req.id).await {
        Ok(ttl) => {
            let rev = g.lease.server.store().current_rev();
            let resp = keel_proto::etcdserverpb::LeaseKeepAliveResponse { header: g.lease.server.header(rev), id: req.id, ttl };
            ([(header::CONTENT_TYPE, "application/json")], result_line(&resp)).into_response()
        }
        Err(e) => error(crate::errors::status(e)),
    }
}

/// A watch: the request body creates one watcher; its responses stream back, one per line.
async fn watch(g: &Gateway, body: Bytes, token: &Token, permit: tokio::sync::OwnedSemaphorePermit) -> Response {
    let req: WatchRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let Some(RequestUnion::CreateRequest(c)) = req.request_union else {
        return error(Status::invalid_argument("etcdserver: the gateway watch needs a create_request"));
    };
    let server = &g.kv.server;
    let caller = with_token((), token);
    if let Err(e) =
        crate::api::caller(server, &caller).and_then(|who| server.check_read(&who, &c.key, &c.range_end).map_err(crate::errors::status))
    {
        return error(e);
    }
    if c.start_revision < 0 {
        let rev = server.store().current_rev();
        let resp = keel_proto::etcdserverpb::WatchResponse {
            header: g.hub.header(rev),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: crate::api::watch::COMPACTED.to_string(),
            ..Default::default()
        };
        return ([(header::CONTENT_TYPE, "application/json")], result_line(&resp)).into_response();
    }
    let spec = Spec::from_create(&c);
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let stream_id = (1u64 << 62) + g.next_stream.fetch_add(1, Ordering::Relaxed);
    let handle = match g.hub.watch((stream_id, 0), spec, c.start_revision, tx) {
        Ok(h) => h,
        Err(resp) => return ([(header::CONTENT_TYPE, "application/json")], result_line(&resp)).into_response(),
    };
    let hub = g.hub.clone();
    let prev = c.prev_kv;
    let stream = async_stream(move |out: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
        let _permit = permit;
        loop {
            // Ends when the client goes away, even if no event comes.
            let resp = tokio::select! {
                r = rx.recv() => r,
                _ = out.closed() => None,
            };
            let Some(resp) = resp else { break };
            if out.send(Ok(result_line(&resp))).await.is_err() {
                break;
            }
        }
        hub.cancel((stream_id, 0), &handle, prev);
    });
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}

/// A byte stream fed by a task; the task ends when the reader goes away.
fn async_stream<F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

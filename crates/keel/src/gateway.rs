//! The `/v3/...` JSON gateway on the client port (etcd's grpc-gateway): POST a request message as
//! proto3 JSON (field names as in the .proto files, bytes as base64, 64-bit integers as strings),
//! get the response message back the same way. Errors come as
//! `{"error": msg, "message": msg, "code": grpc-code}`; streams as one `{"result": ...}` per line.
//! `/v3beta/...` is the same. Calls the gRPC services' handlers; owns no state.

use crate::api;
use crate::watch::{Spec, WatchHub};
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
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
    pub hub: Arc<WatchHub>,
    /// Watch stream ids for gateway watches (kept apart from the gRPC service's).
    pub next_stream: AtomicU64,
}

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new().route("/v3/{*path}", post(handle)).route("/v3beta/{*path}", post(handle)).with_state(gw)
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

async fn unary<Req, Resp, F, Fut>(body: Bytes, f: F) -> Response
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
    match f(tonic::Request::new(req)).await {
        Ok(resp) => match serde_json::to_string(resp.get_ref()) {
            Ok(s) => ([(header::CONTENT_TYPE, "application/json")], s).into_response(),
            Err(e) => error(Status::internal(e.to_string())),
        },
        Err(e) => error(e),
    }
}

async fn handle(State(gw): State<Arc<Gateway>>, Path(path): Path<String>, body: Bytes) -> Response {
    let g = &*gw;
    match path.trim_end_matches('/') {
        "kv/range" => unary(body, |r| g.kv.range(r)).await,
        "kv/put" => unary(body, |r| g.kv.put(r)).await,
        "kv/deleterange" => unary(body, |r| g.kv.delete_range(r)).await,
        "kv/txn" => unary(body, |r| g.kv.txn(r)).await,
        "kv/compaction" => unary(body, |r| g.kv.compact(r)).await,
        "lease/grant" => unary(body, |r| g.lease.lease_grant(r)).await,
        "lease/revoke" | "kv/lease/revoke" => unary(body, |r| g.lease.lease_revoke(r)).await,
        "lease/timetolive" | "kv/lease/timetolive" => unary(body, |r| g.lease.lease_time_to_live(r)).await,
        "lease/leases" | "kv/lease/leases" => unary(body, |r| g.lease.lease_leases(r)).await,
        "lease/keepalive" => keep_alive(g, body).await,
        "cluster/member/add" => unary(body, |r| g.cluster.member_add(r)).await,
        "cluster/member/remove" => unary(body, |r| g.cluster.member_remove(r)).await,
        "cluster/member/update" => unary(body, |r| g.cluster.member_update(r)).await,
        "cluster/member/list" => unary(body, |r| g.cluster.member_list(r)).await,
        "cluster/member/promote" => unary(body, |r| g.cluster.member_promote(r)).await,
        "maintenance/alarm" => unary(body, |r| g.maintenance.alarm(r)).await,
        "maintenance/status" => unary(body, |r| g.maintenance.status(r)).await,
        "maintenance/defragment" => unary(body, |r| g.maintenance.defragment(r)).await,
        "maintenance/hash" => unary(body, |r| g.maintenance.hash(r)).await,
        "maintenance/hashkv" => unary(body, |r| g.maintenance.hash_kv(r)).await,
        "maintenance/transfer-leadership" => unary(body, |r| g.maintenance.move_leader(r)).await,
        "election/campaign" => unary(body, |r| g.concurrency.campaign(r)).await,
        "election/proclaim" => unary(body, |r| g.concurrency.proclaim(r)).await,
        "election/leader" => unary(body, |r| g.concurrency.leader(r)).await,
        "election/resign" => unary(body, |r| g.concurrency.resign(r)).await,
        "lock/lock" => unary(body, |r| g.concurrency.lock(r)).await,
        "lock/unlock" => unary(body, |r| g.concurrency.unlock(r)).await,
        "watch" => watch(g, body).await,
        _ => error(Status::unimplemented(format!("etcdserver: gateway has no route /v3/{path}"))),
    }
}

fn result_line<T: Serialize>(msg: &T) -> Bytes {
    let mut s = serde_json::json!({ "result": msg }).to_string();
    s.push('\n');
    Bytes::from(s)
}

/// One keep-alive: the answer comes wrapped as a stream result, as etcd's gateway does.
async fn keep_alive(g: &Gateway, body: Bytes) -> Response {
    let req: keel_proto::etcdserverpb::LeaseKeepAliveRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    match api::lease::renew(&g.lease.server, &g.lease.transport, req.id).await {
        Ok(ttl) => {
            let rev = g.lease.server.store().current_rev();
            let resp = keel_proto::etcdserverpb::LeaseKeepAliveResponse { header: g.lease.server.header(rev), id: req.id, ttl };
            ([(header::CONTENT_TYPE, "application/json")], result_line(&resp)).into_response()
        }
        Err(e) => error(e),
    }
}

/// A watch: the request body creates one watcher; its responses stream back, one per line.
async fn watch(g: &Gateway, body: Bytes) -> Response {
    let req: WatchRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let Some(RequestUnion::CreateRequest(c)) = req.request_union else {
        return error(Status::invalid_argument("etcdserver: the gateway watch needs a create_request"));
    };
    let spec = Spec::from_create(&c);
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let stream_id = (1u64 << 62) + g.next_stream.fetch_add(1, Ordering::Relaxed);
    let handle = match g.hub.watch((stream_id, 0), spec, c.start_revision.max(0), tx) {
        Ok(h) => h,
        Err(resp) => return ([(header::CONTENT_TYPE, "application/json")], result_line(&resp)).into_response(),
    };
    let hub = g.hub.clone();
    let prev = c.prev_kv;
    let stream = async_stream(move |out: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>| async move {
        while let Some(resp) = rx.recv().await {
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

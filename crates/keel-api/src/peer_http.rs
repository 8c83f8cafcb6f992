//! etcd's HTTP endpoints on the peer URLs (`etcdhttp`'s peer handler), which members and
//! joining members of either kind call: `GET /members` (the member list as etcd's JSON, the
//! cluster ID in `X-Etcd-Cluster-ID`), `POST /members/promote/<id>` (promotion, answered by
//! the leader), `GET /members/hashkv` (this member's hash at a revision, for the corruption
//! checks), `GET /version`, `GET /downgrade/enabled`, and the peer protocol's `/raft...` and `/leases...` paths
//! (answered by [`keel_server::rafthttp::Handler`]). Anything else is 404, as etcd's mux answers.
//!
//! Calls the server core for the member list and promotion, and the raft handler.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use keel_server::membership::MemberJson;
use keel_server::server::Server;
use std::sync::Arc;

/// The cluster ID header of every peer answer about the cluster.
pub const CLUSTER_ID_HEADER: &str = "X-Etcd-Cluster-ID";

pub fn router(server: Arc<Server>, raft: keel_server::rafthttp::Handler) -> Router {
    let raft = tower::service_fn(move |req: axum::extract::Request| {
        let raft = raft.clone();
        async move { Ok::<_, std::convert::Infallible>(raft.handle(req).await) }
    });
    Router::new()
        .route("/members", any(members))
        .route("/members/promote/{id}", any(promote))
        .route(keel_server::kv_hash::HASH_KV_PATH, any(hash_kv))
        .route("/version", any(version))
        .route("/downgrade/enabled", any(downgrade_enabled))
        .route_service("/raft", raft.clone())
        .route_service("/raft/{*rest}", raft.clone())
        .route_service(keel_server::rafthttp::handler::LEASE_PATH, raft.clone())
        .route_service(keel_server::rafthttp::handler::LEASE_INTERNAL_PATH, raft)
        .with_state(server)
}

/// Go's `http.Error`: the text and a newline, as plain text.
fn text(status: StatusCode, msg: &str) -> Response {
    let mut r = (status, format!("{msg}\n")).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    r
}

/// etcd's `allowMethod`: anything but `allowed` gets 405 with `Allow`.
fn only(method: &Method, allowed: &'static str) -> Option<Response> {
    if method.as_str() == allowed {
        return None;
    }
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
    Some(r)
}

/// JSON as Go's `json.Encoder` writes it (a trailing newline).
fn json_response(cluster_id: u64, body: &impl serde::Serialize) -> Response {
    let mut b = serde_json::to_vec(body).unwrap_or_default();
    b.push(b'\n');
    let mut r = (StatusCode::OK, b).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    with_cluster(r, cluster_id)
}

fn with_cluster(mut r: Response, cluster_id: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("{cluster_id:x}")) {
        r.headers_mut().insert(CLUSTER_ID_HEADER, v);
    }
    r
}

async fn members(State(s): State<Arc<Server>>, method: Method) -> Response {
    if let Some(r) = only(&method, "GET") {
        return r;
    }
    let mut list: Vec<MemberJson> = s.members().members.iter().map(MemberJson::from).collect();
    list.sort_by_key(|m| m.id);
    json_response(s.cluster_id(), &list)
}

/// etcd's `hashKVHandler`: the hash at the revision the JSON body asks (0: the current one), or
/// the compaction hash stored for it.
async fn hash_kv(State(s): State<Arc<Server>>, method: Method, headers: axum::http::HeaderMap, body: axum::body::Bytes) -> Response {
    if let Some(r) = only(&method, "GET") {
        return r;
    }
    let cid = format!("{:x}", s.cluster_id());
    if let Some(given) = headers.get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()) {
        if given != cid {
            return text(StatusCode::PRECONDITION_FAILED, "cluster ID mismatch");
        }
    }
    let req: keel_server::kv_hash::PeerHashKvRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "failed to unmarshal request");
            return text(StatusCode::BAD_REQUEST, "error unmarshalling request");
        }
    };
    match s.hash_by_rev(req.revision).await {
        Ok((h, current)) => {
            let answer = keel_server::kv_hash::PeerHashKv::new(h, current);
            let b = serde_json::to_vec(&answer).unwrap_or_default();
            let mut r = (StatusCode::OK, b).into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            with_cluster(r, s.cluster_id())
        }
        Err(e) => {
            tracing::warn!(revision = req.revision, error = %e, "failed to get hashKV");
            text(StatusCode::BAD_REQUEST, &e)
        }
    }
}

async fn promote(State(s): State<Arc<Server>>, method: Method, Path(id): Path<String>) -> Response {
    if let Some(r) = only(&method, "POST") {
        return r;
    }
    let cid = s.cluster_id();
    let Ok(n) = id.parse::<u64>() else {
        return with_cluster(text(StatusCode::NOT_FOUND, &format!("member {id} not found in cluster")), cid);
    };
    use keel_server::error::Error;
    match s.promote_learner(n).await {
        Ok(list) => {
            let list: Vec<MemberJson> = list
                .into_iter()
                .map(|m| MemberJson {
                    id: m.id,
                    peer_urls: m.peer_ur_ls,
                    name: m.name,
                    client_urls: m.client_ur_ls,
                    is_learner: m.is_learner,
                    is_promote: false,
                })
                .collect();
            json_response(cid, &list)
        }
        Err(e) => {
            tracing::warn!(member_id = format!("{n:x}"), error = %e, "failed to promote a member");
            let r = match e {
                Error::MemberNotFound => text(StatusCode::NOT_FOUND, "membership: ID not found"),
                Error::NotLearner => text(StatusCode::PRECONDITION_FAILED, "membership: can only promote a learner member"),
                Error::LearnerNotReady => {
                    text(StatusCode::PRECONDITION_FAILED, "etcdserver: can only promote a learner member which is in sync with leader")
                }
                other => text(StatusCode::INTERNAL_SERVER_ERROR, crate::errors::status(other).message()),
            };
            with_cluster(r, cid)
        }
    }
}

/// The answer to any other path: etcd's `http.NotFound`, or gRPC's unimplemented to a gRPC
/// call (a Keel member of an earlier build dialing its gRPC peer service). The peer router's
/// fallback.
pub async fn not_found(req: axum::extract::Request) -> Response {
    let grpc = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("").into_http::<axum::body::Body>();
    }
    text(StatusCode::NOT_FOUND, "404 page not found")
}

/// etcd's `GET /downgrade/enabled`: whether a downgrade is in progress, read linearizably.
async fn downgrade_enabled(State(s): State<Arc<Server>>, method: Method) -> Response {
    if let Some(r) = only(&method, "GET") {
        return r;
    }
    let cid = s.cluster_id();
    if let Err(e) = s.linearizable_barrier().await {
        return with_cluster(text(StatusCode::INTERNAL_SERVER_ERROR, &format!("failed linearized read: {e}")), cid);
    }
    let mut r = (StatusCode::OK, if s.downgrade().enabled { "true" } else { "false" }).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    with_cluster(r, cid)
}

async fn version(state: State<Arc<Server>>, method: Method) -> Response {
    if let Some(r) = only(&method, "GET") {
        return r;
    }
    crate::http::version(state).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wrong_methods_get_etcds_405() {
        let r = only(&Method::POST, "GET").unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET");
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"Method Not Allowed\n");
        assert!(only(&Method::GET, "GET").is_none());
    }

    #[tokio::test]
    async fn member_lists_are_etcds_json() {
        let list = vec![MemberJson {
            id: 0x8e9e05c52164694d,
            peer_urls: vec!["http://localhost:2380".into()],
            name: "default".into(),
            client_urls: vec![],
            is_learner: false,
            is_promote: false,
        }];
        let r = json_response(0xcdf818194e3a8c32, &list);
        assert_eq!(r.headers()[CLUSTER_ID_HEADER], "cdf818194e3a8c32");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "[{\"id\":10276657743932975437,\"peerURLs\":[\"http://localhost:2380\"],\"name\":\"default\"}]\n"
        );
    }
}

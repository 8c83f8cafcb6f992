//! Plain HTTP on the client port: `/health` and `/version` (the rest of etcd's HTTP surface comes
//! with the operations issue). Calls the server core for a linearizable read.

use crate::config::{ETCD_CLUSTER_VERSION, ETCD_VERSION};
use crate::server::Server;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use keel_proto::etcdserverpb::RangeRequest;
use std::collections::HashMap;
use std::sync::Arc;

pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .with_state(server)
}

/// The metrics routes alone (for `--listen-metrics-urls`).
pub fn metrics_router(server: Arc<Server>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(server)
}

async fn metrics(State(s): State<Arc<Server>>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], crate::metrics::render(&s))
}

/// The process is alive and its raft loop runs (etcd 3.5's `/livez`).
async fn livez(State(s): State<Arc<Server>>) -> (StatusCode, &'static str) {
    if s.raft().stopped() {
        (StatusCode::SERVICE_UNAVAILABLE, "[-]serializable_read failed: the member stopped\nlivez check failed\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

/// The member can serve: it has a leader, no alarm, and a linearizable read succeeds (`/readyz`).
async fn readyz(State(s): State<Arc<Server>>, q: Query<HashMap<String, String>>) -> (StatusCode, &'static str) {
    let (code, _) = health(State(s), q).await;
    if code == StatusCode::OK {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "readyz check failed\n")
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "etcdserver": ETCD_VERSION, "etcdcluster": ETCD_CLUSTER_VERSION }))
}

/// etcd's health check: a leader, then a read (linearizable unless `?serializable=true`).
async fn health(State(s): State<Arc<Server>>, Query(q): Query<HashMap<String, String>>) -> (StatusCode, Json<serde_json::Value>) {
    // etcd 3.4's body: {"health":"true"|"false"}; the reason goes to the log.
    let unhealthy = |reason: &str| {
        tracing::warn!(reason, "serving /health false");
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"health": "false"})))
    };
    let excluded: Vec<&str> = q.get("exclude").map(|v| v.split(',').collect()).unwrap_or_default();
    for a in s.alarms().get(keel_proto::etcdserverpb::AlarmType::None as i32) {
        let name = keel_proto::etcdserverpb::AlarmType::try_from(a.alarm).map(|t| t.as_str_name()).unwrap_or("NONE");
        if !excluded.contains(&name) {
            return unhealthy(&format!("ALARM {name}"));
        }
    }
    if s.raft().leader() == 0 {
        return unhealthy("RAFT NO LEADER");
    }
    let serializable = q.get("serializable").map(|v| v == "true").unwrap_or(false);
    if !serializable && s.linearizable_barrier().await.is_err() {
        return unhealthy("QGET ERROR");
    }
    let r = RangeRequest { key: b"health".to_vec(), limit: 1, ..Default::default() };
    if keel_mvcc::kv::range(&s.store(), &r).is_err() {
        return unhealthy("QGET ERROR");
    }
    (StatusCode::OK, Json(serde_json::json!({"health": "true"})))
}

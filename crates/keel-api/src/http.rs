//! Plain HTTP on the client port: `/health`, `/livez`, `/readyz`, `/version` and `/metrics`, as
//! etcd 3.6 answers them. Calls the server core for reads and the metrics module for the text.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use keel_config::ETCD_VERSION;
use keel_proto::etcdserverpb::RangeRequest;
use keel_server::server::Server;
use std::sync::Arc;

pub fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/debug/vars", get(debug_vars))
        .with_state(server)
}

/// The metrics routes alone (for `--listen-metrics-urls`).
pub fn metrics_router(server: Arc<Server>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(server)
}

async fn metrics(State(s): State<Arc<Server>>) -> impl axum::response::IntoResponse {
    let m = &keel_metrics::METRICS;
    m.scrapes_in_flight.inc();
    let body = keel_metrics::render(&s.scrape());
    m.scrapes_in_flight.dec();
    m.scrapes.with_label_values(&["200"]).inc();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

/// One of etcd's named checks of `/livez` and `/readyz`.
#[derive(Clone, Copy, PartialEq)]
enum Check {
    SerializableRead,
    LinearizableRead,
    DataCorruption,
    NonLearner,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
            Check::DataCorruption => "data_corruption",
            Check::NonLearner => "non_learner",
        }
    }

    async fn run(self, s: &Server) -> Result<(), String> {
        match self {
            Check::SerializableRead => read_check(s, true).await,
            Check::LinearizableRead => read_check(s, false).await,
            Check::DataCorruption => {
                if s.alarms().has(keel_proto::etcdserverpb::AlarmType::Corrupt) {
                    Err("alarm activated: CORRUPT".into())
                } else {
                    Ok(())
                }
            }
            Check::NonLearner => {
                if s.members().get(s.member_id()).is_some_and(|m| m.is_learner) {
                    Err("not supported for learner".into())
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A one-key range as etcd's health checks issue it (as root, so auth never refuses it).
async fn read_check(s: &Server, serializable: bool) -> Result<(), String> {
    if s.raft().stopped() {
        return Err("etcdserver: server stopped".into());
    }
    if !serializable {
        s.linearizable_barrier().await.map_err(|e| crate::errors::status(e).message().to_string())?;
    }
    let r = RangeRequest { key: b"health".to_vec(), limit: 1, keys_only: true, ..Default::default() };
    keel_mvcc::kv::range(&s.store(), &r).map(|_| ()).map_err(|e| e.to_string())
}

/// etcd 3.6's `/livez` and `/readyz`: the named checks (less those in `?exclude=`), each
/// reported as `[+]name ok` or `[-]name failed: why`; the list is the body on failure and with
/// `?verbose`. Each check's result goes to `etcd_server_healthcheck{type,name}`.
async fn checks(s: &Server, kind: &str, all: &[Check], q: &[(String, String)]) -> (StatusCode, String) {
    let excluded: Vec<&str> = q.iter().filter(|(k, _)| k == "exclude").map(|(_, v)| v.as_str()).collect();
    let verbose = q.iter().any(|(k, _)| k == "verbose");
    let mut report = String::new();
    let mut ok = true;
    let m = &keel_metrics::METRICS;
    for c in all.iter().filter(|c| !excluded.contains(&c.name())) {
        match c.run(s).await {
            Ok(()) => {
                report.push_str(&format!("[+]{} ok\n", c.name()));
                m.healthcheck.with_label_values(&[kind, c.name()]).set(1);
                m.healthchecks.with_label_values(&[kind, c.name(), "success"]).inc();
            }
            Err(why) => {
                ok = false;
                report.push_str(&format!("[-]{} failed: {why}\n", c.name()));
                m.healthcheck.with_label_values(&[kind, c.name()]).set(0);
                m.healthchecks.with_label_values(&[kind, c.name(), "error"]).inc();
            }
        }
    }
    if !ok {
        tracing::error!(path = %format!("/{kind}"), reason = %report, "health check error");
        return (StatusCode::SERVICE_UNAVAILABLE, report);
    }
    if verbose {
        report.push_str("ok\n");
        (StatusCode::OK, report)
    } else {
        (StatusCode::OK, "ok\n".to_string())
    }
}

/// The process is alive and can read its own data (etcd's `/livez`).
async fn livez(State(s): State<Arc<Server>>, q: Query<Vec<(String, String)>>) -> (StatusCode, String) {
    checks(&s, "livez", &[Check::SerializableRead], &q).await
}

/// The member can serve clients (etcd's `/readyz`).
async fn readyz(State(s): State<Arc<Server>>, q: Query<Vec<(String, String)>>) -> (StatusCode, String) {
    checks(&s, "readyz", &[Check::DataCorruption, Check::SerializableRead, Check::LinearizableRead, Check::NonLearner], &q).await
}

/// etcd's `/debug/vars` (Go's expvar): the command line, the file descriptor limit and the raft
/// status. Go's `memstats` has no Keel counterpart and is left out.
async fn debug_vars(State(s): State<Arc<Server>>) -> Json<serde_json::Value> {
    let st = s.raft();
    let fd_limit = keel_metrics::soft_limit("Max open files").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Json(serde_json::json!({
        "cmdline": std::env::args().collect::<Vec<_>>(),
        "file_descriptor_limit": fd_limit,
        "raft.status": {
            "id": format!("{:x}", s.member_id()),
            "term": st.term(),
            "vote": format!("{:x}", st.vote()),
            "commit": st.commit(),
            "lead": format!("{:x}", st.leader()),
            "raftState": st.role(),
            "applied": st.applied(),
            "progress": {},
            "leadtransferee": "0",
        },
    }))
}

/// etcd's `/version`: the server's version, the applied cluster version ("not_decided" before
/// the first is applied) and the storage version ("unknown" before it).
pub(crate) async fn version(State(s): State<Arc<Server>>) -> Json<serde_json::Value> {
    let cluster = s.cluster_version().map(|v| v.to_string()).unwrap_or_else(|| "not_decided".to_string());
    let storage = s.storage_version().unwrap_or_else(|| "unknown".to_string());
    Json(serde_json::json!({ "etcdserver": ETCD_VERSION, "etcdcluster": cluster, "storage": storage }))
}

/// etcd 3.6's `/health`: no alarm (less those in `?exclude=`), a leader (unless
/// `?serializable=true`), then a one-key read; `{"health":"true"|"false","reason":...}`.
async fn health(State(s): State<Arc<Server>>, Query(q): Query<Vec<(String, String)>>) -> (StatusCode, Json<serde_json::Value>) {
    let m = &keel_metrics::METRICS;
    let unhealthy = |reason: String| {
        tracing::warn!(reason = %reason, "serving /health false");
        m.health_failures.inc();
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"health": "false", "reason": reason})))
    };
    let excluded: Vec<&str> = q.iter().filter(|(k, _)| k == "exclude").map(|(_, v)| v.as_str()).collect();
    let serializable = q.iter().any(|(k, v)| k == "serializable" && v == "true");
    for a in s.alarms().get(keel_proto::etcdserverpb::AlarmType::None as i32) {
        let t = keel_proto::etcdserverpb::AlarmType::try_from(a.alarm).unwrap_or(keel_proto::etcdserverpb::AlarmType::None);
        if excluded.contains(&t.as_str_name()) {
            continue;
        }
        let reason = match t {
            keel_proto::etcdserverpb::AlarmType::Nospace => "ALARM NOSPACE",
            keel_proto::etcdserverpb::AlarmType::Corrupt => "ALARM CORRUPT",
            _ => "ALARM UNKNOWN",
        };
        return unhealthy(reason.to_string());
    }
    if !serializable && s.raft().leader() == 0 {
        return unhealthy("RAFT NO LEADER".to_string());
    }
    if let Err(e) = read_check(&s, serializable).await {
        return unhealthy(format!("RANGE ERROR:{e}"));
    }
    m.health_success.inc();
    (StatusCode::OK, Json(serde_json::json!({"health": "true", "reason": ""})))
}

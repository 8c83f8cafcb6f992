//! Prometheus metrics with etcd's names, served at `/metrics` (client URLs and
//! `--listen-metrics-urls`).
//!
//! Counters are bumped where things happen (apply, proposals, gRPC calls, WAL fsync and backend
//! commit through the lower crates' observers); gauges are read from the server's state when
//! scraped. Owns the registry only.

use crate::server::Server;
use axum::body::{Body, Bytes};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerVersion {
    server_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterVersion {
    cluster_version: String,
}

/// go-grpc-prometheus's labels, in the order Go's client prints them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcHandled {
    grpc_code: String,
    grpc_method: String,
    grpc_service: String,
    grpc_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabel {
    hop: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcCall {
    grpc_method: String,
    grpc_service: String,
    grpc_type: String,
}

pub struct Metrics {
    registry: Registry,
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub proposals_committed: Gauge,
    pub proposals_applied: Gauge,
    pub proposals_pending: Gauge,
    pub proposals_failed: Counter,
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    pub db_size: Gauge,
    pub db_size_in_use: Gauge,
    pub keys_total: Gauge,
    pub watchers: Gauge,
    pub puts: Counter,
    pub deletes: Counter,
    pub ranges: Counter,
    pub txns: Counter,
    pub current_revision: Gauge,
    pub compact_revision: Gauge,
    pub server_version: Family<ServerVersion, Gauge>,
    pub cluster_version: Family<ClusterVersion, Gauge>,
    pub grpc_started: Family<GrpcCall, Counter>,
    pub grpc_handled: Family<GrpcHandled, Counter>,
    pub slow_applies: Counter,
    /// Keel's own: each hop of a write and of a linearizable read (`keel_raft::hops`).
    pub hops: Family<HopLabel, Histogram, fn() -> Histogram>,
    /// The family's histograms in `keel_raft::hops::Hop::ALL` order (no lookup per observation).
    hop_hists: Vec<Histogram>,
    /// Keel's own: a proposal from the handler to its applied result.
    pub proposal: Histogram,
}

fn hop_buckets() -> impl Iterator<Item = f64> {
    // 10 us .. ~0.65 s, doubling: the hops of one request are tens to hundreds of microseconds.
    exponential_buckets(0.000_01, 2.0, 17)
}

fn hop_histogram() -> Histogram {
    Histogram::new(hop_buckets())
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // etcd's: 1 ms .. ~4 s, doubling.
    exponential_buckets(0.001, 2.0, 14)
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut r = Registry::default();
    let m = Metrics {
        registry: Registry::default(),
        has_leader: Gauge::default(),
        is_leader: Gauge::default(),
        leader_changes: Counter::default(),
        proposals_committed: Gauge::default(),
        proposals_applied: Gauge::default(),
        proposals_pending: Gauge::default(),
        proposals_failed: Counter::default(),
        wal_fsync: Histogram::new(seconds_buckets()),
        backend_commit: Histogram::new(seconds_buckets()),
        db_size: Gauge::default(),
        db_size_in_use: Gauge::default(),
        keys_total: Gauge::default(),
        watchers: Gauge::default(),
        puts: Counter::default(),
        deletes: Counter::default(),
        ranges: Counter::default(),
        txns: Counter::default(),
        current_revision: Gauge::default(),
        compact_revision: Gauge::default(),
        server_version: Family::default(),
        cluster_version: Family::default(),
        grpc_started: Family::default(),
        grpc_handled: Family::default(),
        slow_applies: Counter::default(),
        hops: Family::new_with_constructor(hop_histogram as fn() -> Histogram),
        hop_hists: Vec::new(),
        proposal: Histogram::new(hop_buckets()),
    };
    r.register("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not.", m.has_leader.clone());
    r.register("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise.", m.is_leader.clone());
    r.register("etcd_server_leader_changes_seen", "The number of leader changes seen.", m.leader_changes.clone());
    r.register(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        m.proposals_committed.clone(),
    );
    r.register("etcd_server_proposals_applied_total", "The total number of consensus proposals applied.", m.proposals_applied.clone());
    r.register("etcd_server_proposals_pending", "The current number of pending proposals to commit.", m.proposals_pending.clone());
    r.register("etcd_server_proposals_failed", "The total number of failed proposals seen.", m.proposals_failed.clone());
    r.register(
        "etcd_server_slow_apply",
        "The total number of slow apply requests (likely overloaded from slow disk).",
        m.slow_applies.clone(),
    );
    r.register("etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL.", m.wal_fsync.clone());
    r.register(
        "etcd_disk_backend_commit_duration_seconds",
        "The latency distributions of commit called by backend.",
        m.backend_commit.clone(),
    );
    r.register(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        m.db_size.clone(),
    );
    r.register(
        "etcd_mvcc_db_total_size_in_use_in_bytes",
        "Total size of the underlying database logically in use in bytes.",
        m.db_size_in_use.clone(),
    );
    r.register(
        "etcd_debugging_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        m.db_size.clone(),
    );
    r.register("etcd_debugging_mvcc_keys_total", "Total number of keys.", m.keys_total.clone());
    r.register("etcd_debugging_mvcc_watcher_total", "Total number of watchers.", m.watchers.clone());
    r.register("etcd_mvcc_put", "Total number of puts seen by this member.", m.puts.clone());
    r.register("etcd_mvcc_delete", "Total number of deletes seen by this member.", m.deletes.clone());
    r.register("etcd_mvcc_range", "Total number of ranges seen by this member.", m.ranges.clone());
    r.register("etcd_mvcc_txn", "Total number of txns seen by this member.", m.txns.clone());
    r.register("etcd_debugging_mvcc_current_revision", "The current revision of store.", m.current_revision.clone());
    r.register("etcd_debugging_mvcc_compact_revision", "The revision of the last compaction in store.", m.compact_revision.clone());
    r.register(
        "etcd_server_version",
        "Which version is running. 1 for 'server_version' label with current version.",
        m.server_version.clone(),
    );
    r.register(
        "etcd_cluster_version",
        "Which version is running. 1 for 'cluster_version' label with current cluster version",
        m.cluster_version.clone(),
    );
    r.register("grpc_server_started", "Total number of RPCs started on the server.", m.grpc_started.clone());
    r.register(
        "grpc_server_handled",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        m.grpc_handled.clone(),
    );
    r.register(
        "keel_raft_hop_duration_seconds",
        "Keel: time spent in each hop of a write (append, commit, follower_append, apply_queue, apply) and of a linearizable read (read_confirm, read_apply).",
        m.hops.clone(),
    );
    r.register(
        "keel_server_proposal_duration_seconds",
        "Keel: time from a request handler proposing to it holding the applied result.",
        m.proposal.clone(),
    );
    m.server_version.get_or_create(&ServerVersion { server_version: crate::config::ETCD_VERSION.into() }).set(1);
    // Labelled major.minor, as etcd does.
    let cv: Vec<&str> = crate::config::ETCD_CLUSTER_VERSION.split('.').take(2).collect();
    m.cluster_version.get_or_create(&ClusterVersion { cluster_version: cv.join(".") }).set(1);
    let hop_hists =
        keel_raft::hops::Hop::ALL.iter().map(|h| m.hops.get_or_create(&HopLabel { hop: h.name().to_string() }).clone()).collect();
    Metrics { registry: r, hop_hists, ..m }
});

/// Connects the lower crates' timing hooks to the histograms.
pub fn install_observers() {
    let _ = keel_wal::FSYNC_OBSERVER.set(|d| METRICS.wal_fsync.observe(d.as_secs_f64()));
    let _ = keel_mvcc::backend::COMMIT_OBSERVER.set(|d| METRICS.backend_commit.observe(d.as_secs_f64()));
    let _ = keel_raft::hops::OBSERVER.set(|h, d| {
        if let Some(hist) = keel_raft::hops::Hop::ALL.iter().position(|x| *x == h).and_then(|i| METRICS.hop_hists.get(i)) {
            hist.observe(d.as_secs_f64());
        }
    });
}

/// The exposition text, with gauges read from `s` now.
pub fn render(s: &Server) -> String {
    let m = &*METRICS;
    let st = s.raft();
    m.has_leader.set((st.leader() != 0) as i64);
    m.is_leader.set(st.is_leader() as i64);
    let changes = st.leader_changes();
    let seen = m.leader_changes.get();
    if changes > seen {
        m.leader_changes.inc_by(changes - seen);
    }
    m.proposals_committed.set(st.commit() as i64);
    m.proposals_applied.set(st.applied() as i64);
    m.proposals_pending.set(s.pending_proposals() as i64);
    {
        let store = s.store();
        let size = store.db_size();
        m.db_size.set(size as i64);
        m.db_size_in_use.set(store.data_size().min(size) as i64);
        m.keys_total.set(store.live_key_count() as i64);
        m.current_revision.set(store.current_rev());
        m.compact_revision.set(store.compacted_rev());
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out
}

/// How a gRPC method streams (go-grpc-prometheus's `grpc_type`).
fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => "server_stream",
        _ => "unary",
    }
}

fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

fn status_of(h: &http::HeaderMap) -> Option<i32> {
    h.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Counts gRPC calls by service, method and final code: a middleware for the gRPC routes.
pub async fn grpc_layer(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return next.run(req).await;
    };
    let call =
        GrpcCall { grpc_method: method.to_string(), grpc_service: service.to_string(), grpc_type: grpc_type(service, method).to_string() };
    METRICS.grpc_started.get_or_create(&call).inc();
    let resp = next.run(req).await;
    if let Some(code) = status_of(resp.headers()) {
        // A trailers-only response: the call ended with its headers.
        handled(&call, code);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    axum::response::Response::from_parts(parts, Body::new(Observed { inner: body, call: Some(call) }))
}

fn handled(call: &GrpcCall, code: i32) {
    let l = GrpcHandled {
        grpc_code: code_name(code).to_string(),
        grpc_method: call.grpc_method.clone(),
        grpc_service: call.grpc_service.clone(),
        grpc_type: call.grpc_type.clone(),
    };
    METRICS.grpc_handled.get_or_create(&l).inc();
}

/// A response body that reports the call's code from its trailers, or `Canceled` when the
/// client goes away before the end.
struct Observed {
    inner: Body,
    call: Option<GrpcCall>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    if let Some(call) = self.call.take() {
                        handled(&call, status_of(t).unwrap_or(0));
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    handled(&call, 0);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = self.call.take() {
                    handled(&call, 2);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            handled(&call, 1);
        }
    }
}

//! Prometheus metrics with etcd 3.6's families, served at `/metrics` (client URLs and
//! `--listen-metrics-urls`) in Prometheus' text format, as etcd serves them.
//!
//! Every family etcd 3.6 exports is here with its name, type, label names and histogram buckets
//! (`tests/metrics.rs` compares them with a real etcd's), so that etcd's dashboards and alerts
//! work on Keel unchanged. Counters and histograms are fed where things happen (apply, the gRPC
//! layer, the peer transport, the WAL and backend through the lower crates' observers); gauges
//! are read from the server's state when scraped. Families for parts Keel does not have stay at
//! zero, as they do on an etcd that does not use them: the v2 store (`etcd_debugging_store_*`),
//! the gRPC proxy (`etcd_grpc_proxy_*`) and bbolt's commit phases (rebalance, spill). The `go_*`
//! families are there for dashboards that plot them: `go_threads`, `go_goroutines` (live tokio
//! tasks) and `go_sched_gomaxprocs_threads` carry Keel's values, the Go garbage collector's and
//! memory statistics stay at zero (`process_resident_memory_bytes` is the memory figure).
//! Owns the registry and the families only: values are pushed in where things happen (apply,
//! the gRPC layer, the peer transport) or handed over at scrape time ([`render`] takes a
//! [`Scrape`] of the server's gauges); the WAL's, backend's and raft's timings come through
//! their crates' observer hooks ([`install_observers`]). May call keel-wal, keel-mvcc and
//! keel-raft (for those hooks) and nothing of the server.

use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::sync::atomic::{AtomicBool, Ordering};

/// One counter of a labelled family, kept by whoever increments it often.
pub type Counter = prometheus::IntCounter;
use std::sync::LazyLock;

/// etcd's `--metrics extensive`: also the per-method gRPC latency histograms.
static EXTENSIVE: AtomicBool = AtomicBool::new(false);
/// `--warning-unary-request-duration` in microseconds: slower unary calls are logged.
static WARN_UNARY_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(300_000);

/// The member's metrics settings, from its flags.
pub struct Settings<'a> {
    /// `--metrics extensive`: also the per-method gRPC latency histograms.
    pub extensive: bool,
    /// `--warning-unary-request-duration`: slower unary calls are logged.
    pub warn_unary: std::time::Duration,
    /// Whether each of [`FEATURE_GATES`] is on (`--feature-gates`).
    pub feature: &'a dyn Fn(&str) -> bool,
    /// The etcd server version reported, and the cluster version (`major.minor.patch`; the
    /// family labels it `major.minor`, as etcd does).
    pub server_version: &'a str,
    pub cluster_version: &'a str,
}

/// Selects `basic` or `extensive` metrics and records the feature gates, before the first
/// request.
pub fn configure(s: &Settings<'_>) {
    EXTENSIVE.store(s.extensive, Ordering::Relaxed);
    WARN_UNARY_MICROS.store(s.warn_unary.as_micros() as u64, Ordering::Relaxed);
    for (name, stage, _) in FEATURE_GATES {
        METRICS.feature_enabled.with_label_values(&[name, stage]).set(i64::from((s.feature)(name)));
    }
    METRICS.server_version.with_label_values(&[s.server_version]).set(1);
    let cv: Vec<&str> = s.cluster_version.split('.').take(2).collect();
    METRICS.cluster_version.with_label_values(&[&cv.join(".")]).set(1);
}

/// True with `--metrics extensive`.
pub fn extensive() -> bool {
    EXTENSIVE.load(Ordering::Relaxed)
}

/// Unary calls slower than this are logged (`--warning-unary-request-duration`).
pub fn warn_unary() -> std::time::Duration {
    std::time::Duration::from_micros(WARN_UNARY_MICROS.load(Ordering::Relaxed))
}

pub struct Metrics {
    registry: Registry,
    /// Only gathered with `--metrics extensive`.
    extensive: Registry,
    // Server.
    pub has_leader: IntGauge,
    pub is_leader: IntGauge,
    pub is_learner: IntGauge,
    pub leader_changes: IntCounter,
    pub proposals_committed: IntGauge,
    pub proposals_applied: IntGauge,
    /// Keel's own: the first entry the raft log holds.
    pub raft_log_first_index: IntGauge,
    /// Keel's own: the first entry the raft log holds in memory.
    pub raft_log_memory_first_index: IntGauge,
    pub proposals_pending: IntGauge,
    pub proposals_failed: IntCounter,
    pub slow_applies: IntCounter,
    pub heartbeat_failures: IntCounter,
    pub read_indexes_failed: IntCounter,
    pub slow_read_indexes: IntCounter,
    pub snapshot_apply_in_progress: IntGauge,
    pub learner_promotes: IntCounter,
    pub quota_backend_bytes: Gauge,
    pub server_id: IntGaugeVec,
    server_version: IntGaugeVec,
    cluster_version: IntGaugeVec,
    go_version: IntGaugeVec,
    pub feature_enabled: IntGaugeVec,
    pub apply_duration: HistogramVec,
    pub range_duration: HistogramVec,
    pub client_requests: IntCounterVec,
    pub health_success: IntCounter,
    pub health_failures: IntCounter,
    pub healthcheck: IntGaugeVec,
    pub healthchecks: IntCounterVec,
    // Disk.
    pub wal_fsync: Histogram,
    pub wal_write: Histogram,
    pub wal_write_bytes: IntGauge,
    pub backend_commit: Histogram,
    pub backend_commit_write: Histogram,
    pub backend_defrag: Histogram,
    pub backend_snapshot: Histogram,
    pub defrag_inflight: IntGauge,
    pub snap_fsync: Histogram,
    pub snap_db_save: Histogram,
    pub snap_save_total: Histogram,
    // MVCC.
    pub db_size: IntGauge,
    pub db_size_in_use: IntGauge,
    pub puts: IntCounter,
    pub deletes: IntCounter,
    pub ranges: IntCounter,
    pub txns: IntCounter,
    pub hash: Histogram,
    pub hash_rev: Histogram,
    pub keys_total: IntGauge,
    pub watchers: IntGauge,
    pub watch_streams: IntGauge,
    pub slow_watchers: IntGauge,
    pub events: IntCounter,
    pub total_put_size: IntGauge,
    pub current_revision: IntGauge,
    pub compact_revision: IntGauge,
    pub db_compaction_last: Gauge,
    pub db_compaction_pause: Histogram,
    pub db_compaction_total: Histogram,
    pub index_compaction_pause: Histogram,
    // Lease and auth.
    /// etcd counts its v2 store's operations, which hold its member records; Keel counts the
    /// same operations on its member records (create, set, update, delete; getRecursive at load).
    pub store_reads: IntCounterVec,
    pub store_writes: IntCounterVec,
    pub lease_granted: IntCounter,
    pub lease_renewed: IntCounter,
    pub lease_revoked: IntCounter,
    pub lease_expired: IntCounter,
    pub lease_ttl: Histogram,
    pub auth_revision: IntGauge,
    // Network.
    pub grpc_received_bytes: IntCounter,
    pub grpc_sent_bytes: IntCounter,
    pub known_peers: IntGaugeVec,
    pub active_peers: IntGaugeVec,
    pub peer_sent_bytes: IntCounterVec,
    pub peer_received_bytes: IntCounterVec,
    pub snapshot_send_success: IntCounterVec,
    pub snapshot_send_failures: IntCounterVec,
    /// Keel's own: snapshot sends by the body sent, etcd's (`etcd`) or Keel's records (`keel`).
    pub snapshot_send_format: IntCounterVec,
    pub snapshot_receive_success: IntCounterVec,
    pub snapshot_receive_failures: IntCounterVec,
    pub peer_sent_failures: IntCounterVec,
    /// A probe's round trip to each peer (the peer transport's prober, every 4 s as etcd's).
    pub peer_round_trip: HistogramVec,
    // gRPC (go-grpc-prometheus).
    pub grpc_started: IntCounterVec,
    pub grpc_handled: IntCounterVec,
    pub grpc_msg_received: IntCounterVec,
    pub grpc_msg_sent: IntCounterVec,
    pub grpc_handling: HistogramVec,
    // The process and the metrics handler.
    os_fd_used: IntGauge,
    os_fd_limit: IntGauge,
    net_received: IntCounter,
    net_sent: IntCounter,
    vm_max: Gauge,
    pub scrapes_in_flight: IntGauge,
    pub scrapes: IntCounterVec,
    go_goroutines: IntGauge,
    go_threads: IntGauge,
    go_maxprocs: IntGauge,
    /// Keel's own: each hop of a write and of a linearizable read (`keel_raft::hops`).
    hops: HistogramVec,
    /// The family's histograms in `keel_raft::hops::Hop::ALL` order (no lookup per observation).
    hop_hists: Vec<Histogram>,
    /// Keel's own: a proposal from the handler to its applied result.
    pub proposal: Histogram,
    /// etcd 3.7: a request's latency by type (`Range`, `ReadonlyTxn`, and every proposed kind).
    pub request_duration: HistogramVec,
    /// etcd 3.7: a watch stream sending a response of events (all of them, and per event), a
    /// control response (created, canceled), a progress notification.
    pub watch_send_events: Histogram,
    pub watch_send_per_event: Histogram,
    pub watch_send_control: Histogram,
    pub watch_send_progress: Histogram,
}

/// `count` buckets from `start`, each `factor` times the last (Go's ExponentialBuckets).
fn exp(start: f64, factor: f64, count: usize) -> Vec<f64> {
    exponential_buckets(start, factor, count).unwrap_or_default()
}

/// The gRPC services and methods Keel serves, with go-grpc-prometheus' stream kind: every
/// (method, code) pair starts at zero, as etcd's interceptors pre-register them.
pub const GRPC_METHODS: &[(&str, &[&str])] = &[
    ("etcdserverpb.KV", &["Range", "RangeStream", "Put", "DeleteRange", "Txn", "Compact"]),
    ("etcdserverpb.Watch", &["Watch"]),
    ("etcdserverpb.Lease", &["LeaseGrant", "LeaseRevoke", "LeaseKeepAlive", "LeaseTimeToLive", "LeaseLeases"]),
    ("etcdserverpb.Cluster", &["MemberAdd", "MemberRemove", "MemberUpdate", "MemberList", "MemberPromote"]),
    ("etcdserverpb.Maintenance", &["Alarm", "Status", "Defragment", "Hash", "HashKV", "Snapshot", "MoveLeader", "Downgrade"]),
    (
        "etcdserverpb.Auth",
        &[
            "AuthEnable",
            "AuthDisable",
            "AuthStatus",
            "Authenticate",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        ],
    ),
    ("v3electionpb.Election", &["Campaign", "Proclaim", "Leader", "Observe", "Resign"]),
    ("v3lockpb.Lock", &["Lock", "Unlock"]),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
];

/// etcd 3.7's feature gates with their stage and default (`etcd_server_feature_enabled`).
pub const FEATURE_GATES: &[(&str, &str, bool)] = &[
    ("AllAlpha", "ALPHA", false),
    ("AllBeta", "BETA", false),
    ("CompactHashCheck", "ALPHA", false),
    ("FastLeaseKeepAlive", "BETA", true),
    ("InitialCorruptCheck", "ALPHA", false),
    ("LeaseCheckpoint", "ALPHA", false),
    ("LeaseCheckpointPersist", "ALPHA", false),
    ("PriorityRequest", "ALPHA", false),
    ("SetMemberLocalAddr", "ALPHA", false),
    ("StopGRPCServiceOnDefrag", "ALPHA", false),
    ("TxnModeWriteWithSharedBuffer", "BETA", true),
];

/// gRPC status code names as go-grpc-prometheus prints them, by code.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

pub fn code_name(code: i32) -> &'static str {
    usize::try_from(code).ok().and_then(|c| CODE_NAMES.get(c)).copied().unwrap_or("Unknown")
}

/// Registers metrics into a registry; a name clash is a programming error found by the tests.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> C {
        if let Err(e) = self.0.register(Box::new(c.clone())) {
            tracing::error!(error = %e, "metrics: registration failed");
        }
        c
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric name"))
    }
    fn fgauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help).expect("valid metric name"))
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric name"))
    }
    fn hist(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        self.add(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric name"))
    }
    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name"))
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name"))
    }
    fn hists(&self, name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]) -> HistogramVec {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric name"))
    }
}

/// Families Keel has no part for, or does not feed yet: registered so that they are present,
/// never changed. Not fed yet: the received backend's fsync (`etcd_snap_db_fsync_*`, inside the
/// backend's load), the snapshot encoding time, open read transactions (redb's are not counted),
/// pending watch events (Keel sends or moves a watcher to catch-up at once), compacted key
/// counts, and peer round-trip times (Keel has no prober).
fn register_unused(r: &Reg<'_>) {
    let ms = exp(0.001, 2.0, 14);
    r.hist("etcd_snap_db_fsync_duration_seconds", "The latency distributions of fsyncing .snap.db file", ms.clone());
    r.hist(
        "etcd_debugging_snap_save_marshalling_duration_seconds",
        "The marshalling cost distributions of save called by snapshot.",
        ms.clone(),
    );
    r.gauge("etcd_mvcc_db_open_read_transactions", "The number of currently open read transactions");
    r.gauge("etcd_debugging_mvcc_pending_events_total", "Total number of pending events to be sent.");
    r.counter("etcd_debugging_mvcc_db_compaction_keys_total", "Total number of db keys compacted.");
    r.hist(
        "etcd_debugging_disk_backend_commit_rebalance_duration_seconds",
        "The latency distributions of commit.rebalance called by bboltdb backend.",
        ms.clone(),
    );
    r.hist(
        "etcd_debugging_disk_backend_commit_spill_duration_seconds",
        "The latency distributions of commit.spill called by bboltdb backend.",
        ms,
    );
    r.counter("etcd_debugging_store_expires_total", "Total number of expired keys.");
    r.counter("etcd_debugging_store_watch_requests_total", "Total number of incoming watch requests (new or reestablished).");
    r.gauge("etcd_debugging_store_watchers", "Count of currently active watchers.");
    r.gauge("etcd_grpc_proxy_cache_hits_total", "Total number of cache hits");
    r.gauge("etcd_grpc_proxy_cache_keys_total", "Total number of keys/ranges cached");
    r.gauge("etcd_grpc_proxy_cache_misses_total", "Total number of cache misses");
    r.counter("etcd_grpc_proxy_events_coalescing_total", "Total number of events coalescing");
    r.gauge("etcd_grpc_proxy_watchers_coalescing_total", "Total number of current watchers coalescing");
    r.counters("etcd_network_peer_received_failures_total", "The total number of receive failures from peers.", &["From"]);
    // The Go runtime's own families (see the module doc).
    for (name, help) in [
        ("go_gc_gogc_percent", "Heap size target percentage configured by the user, otherwise 100. This value is set by the GOGC environment variable, and the runtime/debug.SetGCPercent function. Sourced from /gc/gogc:percent."),
        ("go_gc_gomemlimit_bytes", "Go runtime memory limit configured by the user, otherwise math.MaxInt64. This value is set by the GOMEMLIMIT environment variable, and the runtime/debug.SetMemoryLimit function. Sourced from /gc/gomemlimit:bytes."),
        ("go_memstats_alloc_bytes", "Number of heap bytes allocated and currently in use, equals to /memory/classes/heap/objects:bytes."),
        ("go_memstats_buck_hash_sys_bytes", "Number of bytes used by the profiling bucket hash table, equals to /memory/classes/profiling/buckets:bytes."),
        ("go_memstats_gc_sys_bytes", "Number of bytes used for garbage collection system metadata, equals to /memory/classes/metadata/other:bytes."),
        ("go_memstats_heap_alloc_bytes", "Number of heap bytes allocated and currently in use, same as go_memstats_alloc_bytes. Equals to /memory/classes/heap/objects:bytes."),
        ("go_memstats_heap_idle_bytes", "Number of heap bytes waiting to be used, equals to /memory/classes/heap/released:bytes + /memory/classes/heap/free:bytes."),
        ("go_memstats_heap_inuse_bytes", "Number of heap bytes that are in use, equals to /memory/classes/heap/objects:bytes + /memory/classes/heap/unused:bytes"),
        ("go_memstats_heap_objects", "Number of currently allocated objects. Equals to /gc/heap/objects:objects."),
        ("go_memstats_heap_released_bytes", "Number of heap bytes released to OS, equals to /memory/classes/heap/released:bytes."),
        ("go_memstats_heap_sys_bytes", "Number of heap bytes obtained from system, equals to /memory/classes/heap/objects:bytes + /memory/classes/heap/unused:bytes + /memory/classes/heap/released:bytes + /memory/classes/heap/free:bytes."),
        ("go_memstats_last_gc_time_seconds", "Number of seconds since 1970 of last garbage collection."),
        ("go_memstats_mcache_inuse_bytes", "Number of bytes in use by mcache structures, equals to /memory/classes/metadata/mcache/inuse:bytes."),
        ("go_memstats_mcache_sys_bytes", "Number of bytes used for mcache structures obtained from system, equals to /memory/classes/metadata/mcache/inuse:bytes + /memory/classes/metadata/mcache/free:bytes."),
        ("go_memstats_mspan_inuse_bytes", "Number of bytes in use by mspan structures, equals to /memory/classes/metadata/mspan/inuse:bytes."),
        ("go_memstats_mspan_sys_bytes", "Number of bytes used for mspan structures obtained from system, equals to /memory/classes/metadata/mspan/inuse:bytes + /memory/classes/metadata/mspan/free:bytes."),
        ("go_memstats_next_gc_bytes", "Number of heap bytes when next garbage collection will take place. Equals to /gc/heap/goal:bytes."),
        ("go_memstats_other_sys_bytes", "Number of bytes used for other system allocations, equals to /memory/classes/other:bytes."),
        ("go_memstats_stack_inuse_bytes", "Number of bytes obtained from system for stack allocator in non-CGO environments. Equals to /memory/classes/heap/stacks:bytes."),
        ("go_memstats_stack_sys_bytes", "Number of bytes obtained from system for stack allocator. Equals to /memory/classes/heap/stacks:bytes + /memory/classes/os-stacks:bytes."),
        ("go_memstats_sys_bytes", "Number of bytes obtained from system. Equals to /memory/classes/total:byte."),
    ] {
        r.gauge(name, help);
    }
    for (name, help) in [
        ("go_memstats_alloc_bytes_total", "Total number of bytes allocated in heap until now, even if released already. Equals to /gc/heap/allocs:bytes."),
        ("go_memstats_frees_total", "Total number of heap objects frees. Equals to /gc/heap/frees:objects + /gc/heap/tiny/allocs:objects."),
        ("go_memstats_mallocs_total", "Total number of heap objects allocated, both live and gc-ed. Semantically a counter version for go_memstats_heap_objects gauge. Equals to /gc/heap/allocs:objects + /gc/heap/tiny/allocs:objects."),
    ] {
        r.counter(name, help);
    }
    r.gauges("go_info", "Information about the Go environment.", &["version"]).with_label_values(&["keel"]).set(1);
}

/// Go's summary of garbage-collection pauses: Keel has no collector, so it is always empty. The
/// Prometheus crate has no summary type; the family is written out as Go writes an empty one.
const GO_GC_SUMMARY: &str =
    "# HELP go_gc_duration_seconds A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile=\"0\"} 0
go_gc_duration_seconds{quantile=\"0.25\"} 0
go_gc_duration_seconds{quantile=\"0.5\"} 0
go_gc_duration_seconds{quantile=\"0.75\"} 0
go_gc_duration_seconds{quantile=\"1\"} 0
go_gc_duration_seconds_sum 0
go_gc_duration_seconds_count 0
";

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let extensive = Registry::new();
    let r = Reg(&registry);
    let disk = exp(0.001, 2.0, 14);
    let grpc_labels = ["grpc_type", "grpc_service", "grpc_method"];
    let m = Metrics {
        has_leader: r.gauge("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not."),
        is_leader: r.gauge("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise."),
        is_learner: r.gauge("etcd_server_is_learner", "Whether or not this member is a learner. 1 if is, 0 otherwise."),
        leader_changes: r.counter("etcd_server_leader_changes_seen_total", "The number of leader changes seen."),
        proposals_committed: r.gauge("etcd_server_proposals_committed_total", "The total number of consensus proposals committed."),
        proposals_applied: r.gauge("etcd_server_proposals_applied_total", "The total number of consensus proposals applied."),
        raft_log_first_index: r.gauge(
            "keel_raft_log_first_index",
            "Keel: the first entry this member's raft log holds; a follower behind it is sent a snapshot.",
        ),
        raft_log_memory_first_index: r.gauge(
            "keel_raft_log_memory_first_index",
            "Keel: the first entry this member's raft log holds in memory; older ones are read back from the WAL for a follower behind it.",
        ),
        proposals_pending: r.gauge("etcd_server_proposals_pending", "The current number of pending proposals to commit."),
        proposals_failed: r.counter("etcd_server_proposals_failed_total", "The total number of failed proposals seen."),
        slow_applies: r.counter("etcd_server_slow_apply_total", "The total number of slow apply requests (likely overloaded from slow disk)."),
        heartbeat_failures: r.counter(
            "etcd_server_heartbeat_send_failures_total",
            "The total number of leader heartbeat send failures (likely overloaded from slow disk).",
        ),
        read_indexes_failed: r.counter("etcd_server_read_indexes_failed_total", "The total number of failed read indexes seen."),
        slow_read_indexes: r.counter(
            "etcd_server_slow_read_indexes_total",
            "The total number of pending read indexes not in sync with leader's or timed out read index requests.",
        ),
        snapshot_apply_in_progress: r
            .gauge("etcd_server_snapshot_apply_in_progress_total", "1 if the server is applying the incoming snapshot. 0 if none."),
        learner_promotes: r.counter(
            "etcd_server_learner_promote_successes",
            "The total number of successful learner promotions while this member is leader.",
        ),
        quota_backend_bytes: r.fgauge("etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes."),
        server_id: r.gauges("etcd_server_id", "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.", &["server_id"]),
        server_version: r.gauges(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version.",
            &["server_version"],
        ),
        cluster_version: r.gauges(
            "etcd_cluster_version",
            "Which version is running. 1 for 'cluster_version' label with current cluster version",
            &["cluster_version"],
        ),
        go_version: r.gauges(
            "etcd_server_go_version",
            "Which Go version server is running with. 1 for 'server_go_version' label with current version.",
            &["server_go_version"],
        ),
        feature_enabled: r.gauges("etcd_server_feature_enabled", "Whether or not a feature is enabled. 1 is enabled, 0 is not.", &["name", "stage"]),
        apply_duration: r.hists(
            "etcd_server_apply_duration_seconds",
            "The latency distributions of v2 apply called by backend.",
            exp(0.0001, 2.0, 20),
            &["version", "op", "success"],
        ),
        range_duration: r.hists(
            "etcd_server_range_duration_seconds",
            "The latency distributions of txn.Range",
            exp(0.0001, 2.0, 20),
            &["success"],
        ),
        client_requests: r.counters(
            "etcd_server_client_requests_total",
            "The total number of client requests per client version.",
            &["type", "client_api_version"],
        ),
        health_success: r.counter("etcd_server_health_success", "The total number of successful health checks"),
        health_failures: r.counter("etcd_server_health_failures", "The total number of failed health checks"),
        healthcheck: r.gauges("etcd_server_healthcheck", "The result of each kind of healthcheck.", &["type", "name"]),
        healthchecks: r.counters("etcd_server_healthchecks_total", "The total number of each kind of healthcheck.", &["type", "name", "status"]),
        wal_fsync: r.hist("etcd_disk_wal_fsync_duration_seconds", "The latency distributions of fsync called by WAL.", disk.clone()),
        wal_write: r.hist("etcd_disk_wal_write_duration_seconds", "The latency distributions of write called by WAL.", disk.clone()),
        wal_write_bytes: r.gauge("etcd_disk_wal_write_bytes_total", "Total number of bytes written in WAL."),
        backend_commit: r.hist("etcd_disk_backend_commit_duration_seconds", "The latency distributions of commit called by backend.", disk.clone()),
        backend_commit_write: r.hist(
            "etcd_debugging_disk_backend_commit_write_duration_seconds",
            "The latency distributions of commit.write called by bboltdb backend.",
            disk.clone(),
        ),
        backend_defrag: r.hist(
            "etcd_disk_backend_defrag_duration_seconds",
            "The latency distribution of backend defragmentation.",
            exp(0.1, 2.0, 13),
        ),
        backend_snapshot: r.hist(
            "etcd_disk_backend_snapshot_duration_seconds",
            "The latency distribution of backend snapshots.",
            exp(0.01, 2.0, 17),
        ),
        defrag_inflight: r.gauge("etcd_disk_defrag_inflight", "Whether or not defrag is active on the member. 1 means active, 0 means not."),
        snap_fsync: r.hist("etcd_snap_fsync_duration_seconds", "The latency distributions of fsync called by snap.", disk.clone()),
        snap_db_save: r.hist(
            "etcd_snap_db_save_total_duration_seconds",
            "The total latency distributions of v3 snapshot save",
            exp(0.1, 2.0, 10),
        ),
        snap_save_total: r.hist(
            "etcd_debugging_snap_save_total_duration_seconds",
            "The total latency distributions of save called by snapshot.",
            disk.clone(),
        ),
        db_size: r.gauge("etcd_mvcc_db_total_size_in_bytes", "Total size of the underlying database physically allocated in bytes."),
        db_size_in_use: r.gauge("etcd_mvcc_db_total_size_in_use_in_bytes", "Total size of the underlying database logically in use in bytes."),
        puts: r.counter("etcd_mvcc_put_total", "Total number of puts seen by this member."),
        deletes: r.counter("etcd_mvcc_delete_total", "Total number of deletes seen by this member."),
        ranges: r.counter("etcd_mvcc_range_total", "Total number of ranges seen by this member."),
        txns: r.counter("etcd_mvcc_txn_total", "Total number of txns seen by this member."),
        hash: r.hist("etcd_mvcc_hash_duration_seconds", "The latency distribution of storage hash operation.", exp(0.01, 2.0, 15)),
        hash_rev: r.hist(
            "etcd_mvcc_hash_rev_duration_seconds",
            "The latency distribution of storage hash by revision operation.",
            exp(0.01, 2.0, 15),
        ),
        keys_total: r.gauge("etcd_debugging_mvcc_keys_total", "Total number of keys."),
        watchers: r.gauge("etcd_debugging_mvcc_watcher_total", "Total number of watchers."),
        watch_streams: r.gauge("etcd_debugging_mvcc_watch_stream_total", "Total number of watch streams."),
        slow_watchers: r.gauge("etcd_debugging_mvcc_slow_watcher_total", "Total number of unsynced slow watchers."),
        events: r.counter("etcd_debugging_mvcc_events_total", "Total number of events sent by this member."),
        total_put_size: r.gauge("etcd_debugging_mvcc_total_put_size_in_bytes", "The total size of put kv pairs seen by this member."),
        current_revision: r.gauge("etcd_debugging_mvcc_current_revision", "The current revision of store."),
        compact_revision: r.gauge("etcd_debugging_mvcc_compact_revision", "The revision of the last compaction in store."),
        db_compaction_last: r.fgauge("etcd_debugging_mvcc_db_compaction_last", "The unix time of the last db compaction. Resets to 0 on start."),
        db_compaction_pause: r.hist(
            "etcd_debugging_mvcc_db_compaction_pause_duration_milliseconds",
            "Bucketed histogram of db compaction pause duration.",
            exp(1.0, 2.0, 13),
        ),
        db_compaction_total: r.hist(
            "etcd_debugging_mvcc_db_compaction_total_duration_milliseconds",
            "Bucketed histogram of db compaction total duration.",
            exp(100.0, 2.0, 14),
        ),
        index_compaction_pause: r.hist(
            "etcd_debugging_mvcc_index_compaction_pause_duration_milliseconds",
            "Bucketed histogram of index compaction pause duration.",
            exp(0.5, 2.0, 14),
        ),
        store_reads: r.counters(
            "etcd_debugging_store_reads_total",
            "Total number of reads action by (get/getRecursive), local to this member.",
            &["action"],
        ),
        store_writes: r.counters(
            "etcd_debugging_store_writes_total",
            "Total number of writes (e.g. set/compareAndDelete) seen by this member.",
            &["action"],
        ),
        lease_granted: r.counter("etcd_debugging_lease_granted_total", "The total number of granted leases."),
        lease_renewed: r.counter("etcd_debugging_lease_renewed_total", "The number of renewed leases seen by the leader."),
        lease_revoked: r.counter("etcd_debugging_lease_revoked_total", "The total number of revoked leases."),
        lease_expired: r.counter("etcd_debugging_server_lease_expired_total", "The total number of expired leases."),
        lease_ttl: r.hist("etcd_debugging_lease_ttl_total", "Bucketed histogram of lease TTLs.", exp(1.0, 2.0, 24)),
        auth_revision: r.gauge("etcd_debugging_auth_revision", "The current revision of auth store."),
        grpc_received_bytes: r.counter("etcd_network_client_grpc_received_bytes_total", "The total number of bytes received from grpc clients."),
        grpc_sent_bytes: r.counter("etcd_network_client_grpc_sent_bytes_total", "The total number of bytes sent to grpc clients."),
        known_peers: r.gauges("etcd_network_known_peers", "The current number of known peers.", &["Local", "Remote"]),
        active_peers: r.gauges("etcd_network_active_peers", "The current number of active peer connections.", &["Local", "Remote"]),
        peer_sent_bytes: r.counters("etcd_network_peer_sent_bytes_total", "The total number of bytes sent to peers.", &["To"]),
        peer_received_bytes: r.counters("etcd_network_peer_received_bytes_total", "The total number of bytes received from peers.", &["From"]),
        snapshot_send_success: r.counters("etcd_network_snapshot_send_success", "Total number of successful snapshot sends", &["To"]),
        snapshot_send_failures: r.counters("etcd_network_snapshot_send_failures", "Total number of snapshot send failures", &["To"]),
        snapshot_send_format: r.counters(
            "keel_network_snapshot_send_format_total",
            "Snapshot sends to each peer by the body sent: etcd's backend file (etcd) or Keel's records (keel).",
            &["To", "format"],
        ),
        snapshot_receive_success: r.counters(
            "etcd_network_snapshot_receive_success",
            "Total number of successful snapshot receives",
            &["From"],
        ),
        snapshot_receive_failures: r.counters(
            "etcd_network_snapshot_receive_failures",
            "Total number of snapshot receive failures",
            &["From"],
        ),
        peer_sent_failures: r.counters("etcd_network_peer_sent_failures_total", "The total number of send failures from peers.", &["To"]),
        peer_round_trip: r.hists(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers",
            exp(0.0001, 2.0, 16),
            &["To"],
        ),
        grpc_started: r.counters("grpc_server_started_total", "Total number of RPCs started on the server.", &grpc_labels),
        grpc_handled: r.counters(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        ),
        grpc_msg_received: r.counters("grpc_server_msg_received_total", "Total number of RPC stream messages received on the server.", &grpc_labels),
        grpc_msg_sent: r.counters("grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.", &grpc_labels),
        grpc_handling: Reg(&extensive).hists(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            &grpc_labels,
        ),
        os_fd_used: r.gauge("os_fd_used", "The number of used file descriptors."),
        os_fd_limit: r.gauge("os_fd_limit", "The file descriptor limit."),
        net_received: r.counter("process_network_receive_bytes_total", "Number of bytes received by the process over the network."),
        vm_max: r.fgauge("process_virtual_memory_max_bytes", "Maximum amount of virtual memory available in bytes."),
        net_sent: r.counter("process_network_transmit_bytes_total", "Number of bytes sent by the process over the network."),
        scrapes_in_flight: r.gauge("promhttp_metric_handler_requests_in_flight", "Current number of scrapes being served."),
        scrapes: r.counters("promhttp_metric_handler_requests_total", "Total number of scrapes by HTTP status code.", &["code"]),
        go_goroutines: r.gauge("go_goroutines", "Number of goroutines that currently exist."),
        go_threads: r.gauge("go_threads", "Number of OS threads created."),
        go_maxprocs: r.gauge("go_sched_gomaxprocs_threads", "The current runtime.GOMAXPROCS setting, or the number of operating system threads that can execute user-level Go code simultaneously. Sourced from /sched/gomaxprocs:threads."),
        hops: r.hists(
            "keel_raft_hop_duration_seconds",
            "Keel: time spent in each hop of a write (append, commit, follower_append, apply_queue, apply) and of a linearizable read (read_confirm, read_apply).",
            exp(0.000_01, 2.0, 17),
            &["hop"],
        ),
        hop_hists: Vec::new(),
        proposal: r.hist(
            "keel_server_proposal_duration_seconds",
            "Keel: time from a request handler proposing to it holding the applied result.",
            exp(0.000_01, 2.0, 17),
        ),
        request_duration: r.hists(
            "etcd_server_request_duration_seconds",
            "Response latency distribution in seconds for each type.",
            exp(0.001, 2.0, 14),
            &["type", "success"],
        ),
        watch_send_events: r.hist(
            "etcd_debugging_server_watch_send_loop_watch_stream_duration_seconds",
            "The total duration in seconds of running through the send loop watch stream response all events.",
            exp(0.001, 2.0, 14),
        ),
        watch_send_per_event: r.hist(
            "etcd_debugging_server_watch_send_loop_watch_stream_duration_per_event_seconds",
            "The average duration in seconds of running through the send loop watch stream response, per event.",
            exp(0.001, 2.0, 14),
        ),
        watch_send_control: r.hist(
            "etcd_debugging_server_watch_send_loop_control_stream_duration_seconds",
            "The total duration in seconds of running through the send loop control stream response.",
            exp(0.001, 2.0, 14),
        ),
        watch_send_progress: r.hist(
            "etcd_debugging_server_watch_send_loop_progress_duration_seconds",
            "The total duration in seconds of running through the progress loop control stream response.",
            exp(0.001, 2.0, 14),
        ),
        registry: Registry::new(),
        extensive: Registry::new(),
    };
    register_unused(&r);
    #[cfg(target_os = "linux")]
    if let Err(e) = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
        tracing::error!(error = %e, "metrics: registration failed");
    }
    m.go_version.with_label_values(&["keel"]).set(1);
    // Go's handler starts the common codes at zero.
    for code in ["200", "500", "503"] {
        m.scrapes.with_label_values(&[code]);
    }
    for (name, stage, on) in FEATURE_GATES {
        m.feature_enabled.with_label_values(&[name, stage]).set(i64::from(*on));
    }
    for (service, methods) in GRPC_METHODS {
        for method in *methods {
            let t = grpc_type(service, method);
            m.grpc_started.with_label_values(&[t, service, method]);
            m.grpc_msg_received.with_label_values(&[t, service, method]);
            m.grpc_msg_sent.with_label_values(&[t, service, method]);
            for code in CODE_NAMES {
                m.grpc_handled.with_label_values(&[t, service, method, code]);
            }
            m.grpc_handling.with_label_values(&[t, service, method]);
        }
    }
    let hop_hists = keel_raft::hops::Hop::ALL.iter().map(|h| m.hops.with_label_values(&[h.name()])).collect();
    Metrics { registry, extensive, hop_hists, ..m }
});

/// Connects the lower crates' timing hooks to the histograms, and records what is fixed for the
/// life of the process (member ID, quota).
pub fn install_observers() {
    let _ = keel_wal::FSYNC_OBSERVER.set(|d| METRICS.wal_fsync.observe(d.as_secs_f64()));
    let _ = keel_wal::WRITE_OBSERVER.set(|n, d| {
        METRICS.wal_write.observe(d.as_secs_f64());
        METRICS.wal_write_bytes.add(n as i64);
    });
    let _ = keel_mvcc::backend::COMMIT_OBSERVER.set(|d| {
        METRICS.backend_commit.observe(d.as_secs_f64());
        METRICS.backend_commit_write.observe(d.as_secs_f64());
    });
    let _ = keel_wal::SNAP_OBSERVER.set(|total, fsync| {
        METRICS.snap_save_total.observe(total.as_secs_f64());
        METRICS.snap_fsync.observe(fsync.as_secs_f64());
    });
    let _ = keel_raft::hops::OBSERVER.set(|h, d| {
        if let Some(hist) = keel_raft::hops::Hop::ALL.iter().position(|x| *x == h).and_then(|i| METRICS.hop_hists.get(i)) {
            hist.observe(d.as_secs_f64());
        }
    });
}

/// The server's state a scrape reports as gauges, read by the server when scraped.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    pub has_leader: bool,
    pub is_leader: bool,
    pub is_learner: bool,
    /// Leader changes this member has seen (a running total).
    pub leader_changes: u64,
    pub committed: u64,
    pub applied: u64,
    /// The first entry the raft log holds.
    pub raft_log_first_index: u64,
    /// The first entry the raft log holds in memory.
    pub raft_log_memory_first_index: u64,
    pub pending_proposals: usize,
    pub member_id: u64,
    pub quota_backend_bytes: i64,
    /// Every member's ID.
    pub members: Vec<u64>,
    pub db_size: u64,
    /// The backend's bytes in use (pages; etcd's "in use").
    pub db_size_in_use: u64,
    pub data_size: u64,
    pub keys: usize,
    pub current_revision: i64,
    pub compacted_revision: i64,
    pub auth_revision: u64,
}

/// The exposition text (Prometheus text format 0.0.4), with the gauges of `s`.
pub fn render(s: &Scrape) -> String {
    let m = &*METRICS;
    m.has_leader.set(i64::from(s.has_leader));
    m.is_leader.set(i64::from(s.is_leader));
    advance_to(&m.leader_changes, s.leader_changes);
    m.proposals_committed.set(s.committed as i64);
    m.proposals_applied.set(s.applied as i64);
    m.raft_log_first_index.set(s.raft_log_first_index as i64);
    m.raft_log_memory_first_index.set(s.raft_log_memory_first_index as i64);
    m.proposals_pending.set(s.pending_proposals as i64);
    let local = format!("{:x}", s.member_id);
    m.server_id.with_label_values(&[&local]).set(1);
    m.quota_backend_bytes.set(s.quota_backend_bytes as f64);
    m.is_learner.set(i64::from(s.is_learner));
    m.known_peers.reset();
    for id in &s.members {
        m.known_peers.with_label_values(&[&local, &format!("{id:x}")]).set(1);
    }
    let w = &keel_mvcc::watch::STATS;
    m.watchers.set(w.watchers());
    m.slow_watchers.set(w.slow_watchers());
    advance_to(&m.events, w.events());
    m.db_size.set(s.db_size as i64);
    m.db_size_in_use.set(s.db_size_in_use.min(s.db_size) as i64);
    m.keys_total.set(s.keys as i64);
    m.current_revision.set(s.current_revision);
    m.compact_revision.set(s.compacted_revision);
    m.auth_revision.set(s.auth_revision as i64);
    read_process(m);
    let mut families = m.registry.gather();
    if EXTENSIVE.load(Ordering::Relaxed) {
        families.extend(m.extensive.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
    }
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out.push_str(GO_GC_SUMMARY);
    out
}

/// Raises `counter` to `now`, a total read elsewhere (raft's leader changes, the kernel's
/// network bytes) at scrape time. Serialized: two concurrent scrapes reading the same old value
/// would otherwise both add the difference.
fn advance_to(counter: &IntCounter, now: u64) {
    static SCRAPE: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    let _one_at_a_time = SCRAPE.lock();
    let seen = counter.get();
    if now > seen {
        counter.inc_by(now - seen);
    }
}

/// A soft limit of this process from /proc/self/limits, as written there ("unlimited" too):
/// the fourth word of the line naming it ("Max open files  1024  4096  files").
pub fn soft_limit(name: &str) -> Option<String> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(3).map(str::to_string)
}

/// The process's file descriptors, threads, tasks and network bytes, from /proc.
fn read_process(m: &Metrics) {
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        m.os_fd_used.set(d.count() as i64);
    }
    if let Some(v) = soft_limit("Max open files") {
        m.os_fd_limit.set(v.parse().unwrap_or(0));
    }
    // Unlimited is reported as the largest 64-bit value, as Go's procfs does.
    if let Some(v) = soft_limit("Max address space") {
        m.vm_max.set(v.parse().unwrap_or(u64::MAX as f64));
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(n) = status.lines().find_map(|l| l.strip_prefix("Threads:")) {
            m.go_threads.set(n.trim().parse().unwrap_or(0));
        }
    }
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        let rt = h.metrics();
        m.go_goroutines.set(rt.num_alive_tasks() as i64);
        m.go_maxprocs.set(rt.num_workers() as i64);
    }
    // Go's procfs sums every interface of the process's network namespace.
    if let Ok(dev) = std::fs::read_to_string("/proc/self/net/dev") {
        let (mut rx, mut tx) = (0u64, 0u64);
        for l in dev.lines().skip(2) {
            let Some((_, cols)) = l.split_once(':') else { continue };
            let c: Vec<u64> = cols.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if c.len() >= 9 {
                rx += c[0];
                tx += c[8];
            }
        }
        advance_to(&m.net_received, rx);
        advance_to(&m.net_sent, tx);
    }
}

/// Times an apply of one request (`etcd_server_apply_duration_seconds`).
/// etcd 3.7's request latency by type (`etcd_server_request_duration_seconds`).
pub fn observe_request(kind: &str, ok: bool, d: std::time::Duration) {
    METRICS.request_duration.with_label_values(&[kind, if ok { "true" } else { "false" }]).observe(d.as_secs_f64());
}

pub fn observe_apply(op: &str, ok: bool, d: std::time::Duration) {
    METRICS.apply_duration.with_label_values(&["v3", op, if ok { "true" } else { "false" }]).observe(d.as_secs_f64());
}

/// How a gRPC method streams (go-grpc-prometheus's `grpc_type`).
pub fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot")
        | ("etcdserverpb.KV", "RangeStream")
        | ("v3electionpb.Election", "Observe")
        | ("grpc.health.v1.Health", "Watch") => "server_stream",
        _ => "unary",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent scrapes raise a scrape-time counter to the total once, never past it.
    #[test]
    fn concurrent_scrapes_do_not_double_count() {
        for round in 0..50u64 {
            let c = IntCounter::new("t", "t").unwrap();
            let total = 1_000 + round;
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| advance_to(&c, total));
                }
            });
            assert_eq!(c.get(), total);
        }
    }
}

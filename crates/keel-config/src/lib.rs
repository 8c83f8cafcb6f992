//! Command-line flags and `ETCD_*` environment variables, as etcd spells them.
//!
//! Flags follow Go's flag syntax as etcd users type it: `--flag value`, `--flag=value`, a single
//! dash, and bare booleans (`--client-cert-auth`). etcd flags (of any release 3.4-3.7) Keel does
//! not implement are accepted with a warning; a flag no etcd defines is refused, as etcd does.

mod etcd_flags;

use clap::{ArgAction, CommandFactory, Parser};
use std::time::Duration;

/// The etcd release whose observable behaviour Keel matches (etcd 3.7.3, the reference built by
/// `scripts/etcd-ref.sh`), as `/version`, Maintenance.Status and the version metrics report it.
pub const ETCD_VERSION: &str = "3.7.3";
/// The cluster version a cluster of Keel members alone agrees on (etcd's `etcdcluster`,
/// major.minor.0); with older etcd members, or during a downgrade, it is lower.
pub const ETCD_CLUSTER_VERSION: &str = "3.7.0";
/// The storage schema version of a backend whose cluster version is not decided yet. Once it
/// is, the storage version follows it (`keel_server::membership::storage_version`), as etcd
/// 3.6+ migrates its schema to the cluster version.
pub const ETCD_STORAGE_VERSION: &str = "3.7.0";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "keel",
    args_override_self = true,
    allow_negative_numbers = true,
    about = "Keel: a distributed, reliable key-value store speaking etcd's v3 API"
)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: ${name}.etcd).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Path to the dedicated WAL directory.
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<String>,
    /// URLs to listen on for client traffic.
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub listen_client_urls: String,
    /// Client URLs of this member advertised to the cluster.
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,
    /// URLs to listen on for peer traffic.
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS", default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,
    /// Peer URLs of this member advertised to the cluster.
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS", default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (name=peerURL,...).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN", default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// Number of committed transactions to trigger a snapshot to disk (etcd 3.6: 10000).
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u32,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u32,
    /// Log level: debug, info, warn, error, panic, fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<String>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<String>,
    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<String>,
    /// Enable client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub client_cert_auth: bool,
    /// Client TLS using generated certificates.
    #[arg(long, env = "ETCD_AUTO_TLS", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub auto_tls: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<String>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<String>,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<String>,
    /// Enable peer client cert authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub peer_client_cert_auth: bool,
    /// Peer TLS using self-generated certificates.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub peer_auto_tls: bool,
    /// Allowed CommonName for inter-peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,
    /// Allowed TLS hostname for inter-peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME")]
    pub peer_cert_allowed_hostname: Option<String>,
    /// Skip the check that a peer's client certificate names the address it connects from.
    #[arg(long, alias = "experimental-peer-skip-client-san-verification", env = "ETCD_PEER_SKIP_CLIENT_SAN_VERIFICATION", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub peer_skip_client_san_verification: bool,
    /// Dial peers from the IP of the first advertised peer URL (when it is an IP address).
    #[arg(long, env = "ETCD_EXPERIMENTAL_SET_MEMBER_LOCALADDR", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub experimental_set_member_localaddr: bool,
    /// The leader checkpoints remaining lease TTLs through raft, so that a new leader resumes
    /// each lease where it was (etcd 3.5's flag; the `LeaseCheckpoint` feature gate in 3.6).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub experimental_enable_lease_checkpoint: bool,
    /// Duration of periodic watch progress notifications (e.g. 10m, 500ms; etcd's default 10m).
    #[arg(long, env = "ETCD_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "")]
    pub watch_progress_notify_interval: String,
    /// The same (etcd 3.6's experimental spelling, removed in 3.7; Keel still takes it).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "")]
    pub experimental_watch_progress_notify_interval: String,
    /// Keys compacted per batch; writes and reads go on between batches (etcd's default 1000).
    #[arg(long, alias = "experimental-compaction-batch-limit", env = "ETCD_COMPACTION_BATCH_LIMIT", default_value_t = 1000)]
    pub compaction_batch_limit: u64,
    /// Pause between two batches of a compaction (Go duration; etcd's default 10ms).
    #[arg(long, alias = "experimental-compaction-sleep-interval", env = "ETCD_COMPACTION_SLEEP_INTERVAL", default_value = "")]
    pub compaction_sleep_interval: String,
    /// Duration between two corruption checks by the leader, which compares its hash with every
    /// member's (Go duration; etcd's default 0: no periodic check).
    #[arg(long, alias = "experimental-corrupt-check-time", env = "ETCD_CORRUPT_CHECK_TIME", default_value = "")]
    pub corrupt_check_time: String,
    /// Duration between two checks by the leader of the hashes members computed at their
    /// compactions (with the CompactHashCheck gate; Go duration, etcd's default 1m).
    #[arg(long, alias = "experimental-compact-hash-check-time", env = "ETCD_COMPACT_HASH_CHECK_TIME", default_value = "")]
    pub compact_hash_check_time: String,
    /// etcd 3.6's spelling of the InitialCorruptCheck gate (removed in 3.7; Keel still takes it).
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub experimental_initial_corrupt_check: bool,
    /// etcd 3.6's spelling of the CompactHashCheck gate (removed in 3.7; Keel still takes it).
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACT_HASH_CHECK_ENABLED", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub experimental_compact_hash_check_enabled: bool,
    /// Restart as a one-member cluster: uncommitted log entries are dropped and every other
    /// member (voters and learners) is removed by entries appended to this member's log.
    #[arg(long, env = "ETCD_FORCE_NEW_CLUSTER", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub force_new_cluster: bool,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(long, env = "ETCD_STRICT_RECONFIG_CHECK", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", action = ArgAction::Set)]
    pub strict_reconfig_check: bool,
    /// List of URLs to listen on for HTTP-only client traffic (then the client URLs serve gRPC
    /// only).
    #[arg(long, env = "ETCD_LISTEN_CLIENT_HTTP_URLS", default_value = "")]
    pub listen_client_http_urls: String,
    /// List of URLs to listen on for the metrics and health endpoints.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS")]
    pub listen_metrics_urls: Option<String>,
    /// Interpret the auto-compaction retention as a duration ('periodic') or a revision count ('revision').
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Auto compaction retention: hours or a duration (periodic), or revisions (revision). 0 is off.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Minimum interval a client should wait before pinging the server (accepted; hyper enforces
    /// its own ping policy).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_MIN_TIME", default_value = "5s")]
    pub grpc_keepalive_min_time: String,
    /// Frequency of server-to-client pings to check that a connection is alive (0 disables).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_INTERVAL", default_value = "2h")]
    pub grpc_keepalive_interval: String,
    /// How long to wait for a ping answer before closing the connection.
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s")]
    pub grpc_keepalive_timeout: String,
    /// Path to the client certificate revocation list file (PEM or DER).
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<String>,
    /// Comma-separated list of supported TLS cipher suites (Go names; TLS 1.2 only).
    #[arg(long, env = "ETCD_CIPHER_SUITES")]
    pub cipher_suites: Option<String>,
    /// Minimum TLS version: TLS1.2 or TLS1.3.
    #[arg(long, env = "ETCD_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,
    /// Maximum TLS version: TLS1.2 or TLS1.3 (empty: the newest).
    #[arg(long, env = "ETCD_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,
    /// Auth token type and options: `simple`, or `jwt,pub-key=PATH,priv-key=PATH,sign-method=RS256,ttl=5m`.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Time (in seconds) of the auth token's time to live (simple tokens).
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// bcrypt cost for hashing auth passwords (4..=31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// V3 discovery: discovery token for the etcd cluster to be bootstrapped.
    #[arg(long, env = "ETCD_DISCOVERY_TOKEN", default_value = "")]
    pub discovery_token: String,
    /// V3 discovery: comma-separated client URLs of the discovery cluster.
    #[arg(long, env = "ETCD_DISCOVERY_ENDPOINTS", default_value = "")]
    pub discovery_endpoints: String,
    /// V3 discovery: dial timeout for client connections.
    #[arg(long, env = "ETCD_DISCOVERY_DIAL_TIMEOUT", default_value = "2s")]
    pub discovery_dial_timeout: String,
    /// V3 discovery: timeout for discovery requests (excluding dial timeout).
    #[arg(long, env = "ETCD_DISCOVERY_REQUEST_TIMEOUT", default_value = "5s")]
    pub discovery_request_timeout: String,
    /// V3 discovery: disable transport security for client connections (https endpoints still
    /// use TLS).
    #[arg(long, env = "ETCD_DISCOVERY_INSECURE_TRANSPORT", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", action = ArgAction::Set)]
    pub discovery_insecure_transport: bool,
    /// V3 discovery: skip server certificate verification (testing only).
    #[arg(long, env = "ETCD_DISCOVERY_INSECURE_SKIP_TLS_VERIFY", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub discovery_insecure_skip_tls_verify: bool,
    /// V3 discovery: identify secure client using this TLS certificate file.
    #[arg(long, env = "ETCD_DISCOVERY_CERT", default_value = "")]
    pub discovery_cert: String,
    /// V3 discovery: identify secure client using this TLS key file.
    #[arg(long, env = "ETCD_DISCOVERY_KEY", default_value = "")]
    pub discovery_key: String,
    /// V3 discovery: verify certificates of TLS-enabled secure servers using this CA bundle.
    #[arg(long, env = "ETCD_DISCOVERY_CACERT", default_value = "")]
    pub discovery_cacert: String,
    /// V3 discovery: username[:password] for authentication.
    #[arg(long, env = "ETCD_DISCOVERY_USER", default_value = "")]
    pub discovery_user: String,
    /// V3 discovery: password for authentication (when --discovery-user has none).
    #[arg(long, env = "ETCD_DISCOVERY_PASSWORD", default_value = "")]
    pub discovery_password: String,
    /// etcd 3.7's feature gates, `Name=true|false,...` (AllAlpha and AllBeta set every gate of
    /// their stage not named). Honoured: SetMemberLocalAddr, FastLeaseKeepAlive, PriorityRequest,
    /// LeaseCheckpoint, LeaseCheckpointPersist; the others are accepted and change nothing in
    /// Keel.
    #[arg(long, env = "ETCD_FEATURE_GATES", default_value = "")]
    pub feature_gates: String,
    /// Defragment the backend at start when at least this many MB of it are free (0: never).
    #[arg(
        long,
        alias = "experimental-bootstrap-defrag-threshold-megabytes",
        env = "ETCD_BOOTSTRAP_DEFRAG_THRESHOLD_MEGABYTES",
        default_value_t = 0
    )]
    pub bootstrap_defrag_threshold_megabytes: u64,
    /// Entries kept in the raft log after a snapshot, for a slow follower to catch up without a
    /// snapshot of its own (etcd's default 5000).
    #[arg(long, env = "ETCD_SNAPSHOT_CATCHUP_ENTRIES")]
    pub snapshot_catchup_entries: Option<u64>,
    /// The same (deprecated spelling; as in etcd 3.6 it wins when both are given).
    #[arg(long, env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES")]
    pub experimental_snapshot_catchup_entries: Option<u64>,
    /// Log a "request stats" warning for unary requests slower than this (etcd 3.6's flag).
    #[arg(long, env = "ETCD_WARNING_UNARY_REQUEST_DURATION", default_value = "")]
    pub warning_unary_request_duration: String,
    /// The same (deprecated spelling; both at once is refused, as etcd does).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WARNING_UNARY_REQUEST_DURATION", default_value = "")]
    pub experimental_warning_unary_request_duration: String,
    /// etcd's v2 store deprecation level (deprecated: write-only is enforced whatever is given).
    #[arg(long, env = "ETCD_V2_DEPRECATION")]
    pub v2_deprecation: Option<String>,
    /// Log format: `json` (etcd's, the default) or `console`.
    #[arg(long, env = "ETCD_LOG_FORMAT", default_value = "json", value_parser = ["json", "console"])]
    pub log_format: String,
    /// The etcd flags given that Keel ignores (warned about at start).
    #[arg(skip)]
    pub ignored: Vec<String>,
    /// Set level of detail for exported metrics: `basic` or `extensive` (also per-method gRPC
    /// latency histograms).
    #[arg(long, env = "ETCD_METRICS", default_value = "basic", value_parser = ["basic", "extensive"])]
    pub metrics: String,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Keel: most watchers one watch stream may hold; a create past it is canceled with a reason
    /// (etcd has no limit: one client could make the server hold any number).
    #[arg(long, default_value_t = 10_000)]
    pub max_watchers_per_stream: usize,
    /// Keel: most client connections open at once over all client and metrics listeners; a
    /// connection past it is closed when accepted. 0 (the default): the open-file limit less
    /// 512 kept for the member's files and peers (etcd has no limit: a flood of connections
    /// could take the descriptors its WAL needs).
    #[arg(long, env = "ETCD_MAX_CLIENT_CONNECTIONS", default_value_t = 0)]
    pub max_client_connections: usize,
    /// Keel: most bytes of write requests a member holds between their proposal and their
    /// answer; a write past it is refused at once with etcd's "too many requests" (clients back
    /// off and retry). At least one `--max-request-bytes` request always fits.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_pending_proposal_bytes: u64,
    /// Keel: where the key index lives. 0 (the default): all of it in memory, rebuilt from the
    /// backend at every start, as etcd keeps it (about 100-150 bytes per key). Above 0: kept in
    /// the backend, with at most about this many bytes of changed key histories in memory (twice
    /// that while they are merged into the backend), so that memory does not grow with the
    /// number of keys and a start reads only the changes since the last merge.
    #[arg(long, env = "ETCD_KEY_INDEX_MEMORY_BYTES", default_value_t = 0)]
    pub key_index_memory_bytes: u64,
    /// Keel: most bytes of entries' data the raft log keeps in memory. Older entries of the
    /// `--snapshot-catchup-entries` kept for slow followers are read back from the WAL when one
    /// needs them, and the WAL keeps them until they leave the log (etcd keeps all of them in
    /// memory: 5,000 entries of 16 KiB are 80 MB per member). Entries not yet applied always
    /// stay.
    #[arg(long, env = "ETCD_RAFT_LOG_MEMORY_BYTES", default_value_t = 16 << 20)]
    pub raft_log_memory_bytes: u64,
}

/// etcd flags Keel accepts and ignores (they tune etcd internals or select features Keel does
/// differently); each is reported once at start.
const IGNORED_HINT: &str = "flag is accepted for compatibility with etcd and has no effect in Keel";

/// etcd 3.6's notices for deprecated flags Keel accepts and ignores.
const DEPRECATED: &[(&str, &str)] = &[
    ("max-snapshots", "--max-snapshots is deprecated in 3.6 and will be decommissioned in 3.8."),
    (
        "v2-deprecation",
        "--v2-deprecation is deprecated and scheduled for removal in v3.8. The default value is enforced, ignoring user input.",
    ),
];

impl Config {
    /// Parses the process's arguments (and environment) the way etcd does.
    pub fn from_args() -> Result<Config, clap::Error> {
        Self::parse_from_args(std::env::args().collect())
    }

    pub fn parse_from_args(args: Vec<String>) -> Result<Config, clap::Error> {
        let (args, ignored) = normalize_args(args);
        // As etcd: a flag no etcd defines is refused (a typo must not pass unnoticed).
        if let Some(f) = ignored.iter().find(|f| etcd_flags::ETCD_FLAGS.binary_search(&f.as_str()).is_err()) {
            return Err(clap::Error::raw(clap::error::ErrorKind::UnknownArgument, format!("flag provided but not defined: -{f}\n")));
        }
        let mut cfg = Config::try_parse_from(args)?;
        cfg.ignored = ignored;
        Ok(cfg)
    }

    /// Warns about the etcd flags given that Keel ignores, with etcd 3.6's deprecation notice
    /// where etcd has one (once the log is set up).
    pub fn warn_ignored(&self) {
        if self.v2_deprecation.is_some() {
            tracing::warn!(
                "--v2-deprecation is deprecated and scheduled for removal in v3.8. The default value is enforced, ignoring user input."
            );
        }
        if self.experimental_snapshot_catchup_entries.is_some() {
            tracing::warn!("--experimental-snapshot-catchup-entries is deprecated in v3.6 and will be decommissioned in v3.7. Use '--snapshot-catchup-entries' instead.");
        }
        for f in &self.ignored {
            match DEPRECATED.iter().find(|(name, _)| name == f) {
                Some((_, notice)) => tracing::warn!("{notice}"),
                None => tracing::warn!(flag = %f, "{IGNORED_HINT}"),
            }
        }
    }

    pub fn data_dir(&self) -> String {
        self.data_dir.clone().unwrap_or_else(|| format!("{}.etcd", self.name))
    }

    pub fn wal_dir(&self) -> String {
        self.wal_dir.clone().unwrap_or_else(|| format!("{}/member/wal", self.data_dir()))
    }

    pub fn snap_dir(&self) -> String {
        format!("{}/member/snap", self.data_dir())
    }

    /// `--initial-cluster`, or `name=<advertised peer URLs>` when not given (as etcd does).
    pub fn initial_cluster(&self) -> String {
        match &self.initial_cluster {
            Some(c) if !c.is_empty() => c.clone(),
            _ => split_urls(&self.initial_advertise_peer_urls).iter().map(|u| format!("{}={}", self.name, u)).collect::<Vec<_>>().join(","),
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval.max(1))
    }

    /// The backend quota as etcd reports it (Status, `etcd_server_quota_backend_bytes`): the
    /// flag's value, with 0 meaning the 2 GiB default.
    pub fn quota_backend_bytes_reported(&self) -> i64 {
        if self.quota_backend_bytes == 0 {
            2 << 30
        } else {
            self.quota_backend_bytes
        }
    }

    /// Whether lease checkpoints are on: `--experimental-enable-lease-checkpoint` or the
    /// `LeaseCheckpoint` feature gate (off by default, as etcd).
    pub fn lease_checkpoint(&self) -> bool {
        self.experimental_enable_lease_checkpoint || self.feature("LeaseCheckpoint")
    }

    /// The source IP for peer connections, with `--experimental-set-member-localaddr`.
    pub fn member_local_ip(&self) -> Option<std::net::IpAddr> {
        if !(self.experimental_set_member_localaddr || self.feature("SetMemberLocalAddr")) {
            return None;
        }
        let u = split_urls(&self.initial_advertise_peer_urls).into_iter().next()?;
        let rest = u.split_once("://")?.1.trim_end_matches('/');
        let host = rest.rsplit_once(':')?.0.trim_start_matches('[').trim_end_matches(']');
        host.parse().ok().filter(|ip: &std::net::IpAddr| !ip.is_unspecified())
    }

    /// The watch progress interval (Go duration syntax: `10m`, `5s`, `500ms`), at least 100 ms.
    pub fn watch_progress_notify_interval(&self) -> Duration {
        let v = given(&self.watch_progress_notify_interval, &self.experimental_watch_progress_notify_interval);
        parse_go_duration(v).unwrap_or(Duration::from_secs(600)).max(Duration::from_millis(100))
    }

    /// Keys per compaction batch (at least 1).
    pub fn compaction_batch_limit(&self) -> usize {
        (self.compaction_batch_limit as usize).max(1)
    }

    /// The pause between two compaction batches (10 ms unless a flag says otherwise).
    pub fn compaction_sleep_interval(&self) -> Duration {
        parse_go_duration(&self.compaction_sleep_interval).unwrap_or(Duration::from_millis(10))
    }

    /// The leader's periodic corruption check interval; zero: no periodic check.
    pub fn corrupt_check_time(&self) -> Duration {
        parse_go_duration(&self.corrupt_check_time).unwrap_or(Duration::ZERO)
    }

    /// The leader's compaction hash check interval (1 minute unless a flag says otherwise).
    pub fn compact_hash_check_time(&self) -> Duration {
        parse_go_duration(&self.compact_hash_check_time).unwrap_or(Duration::from_secs(60))
    }

    /// Whether a restarted member compares its hash with its peers' before it serves.
    pub fn initial_corrupt_check(&self) -> bool {
        self.experimental_initial_corrupt_check || self.feature("InitialCorruptCheck")
    }

    /// Whether the leader checks the members' compaction hashes.
    pub fn compact_hash_check(&self) -> bool {
        self.experimental_compact_hash_check_enabled || self.feature("CompactHashCheck")
    }

    /// etcd's request timeout: 5 s + 2 × election timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + Duration::from_millis(2 * self.election_timeout)
    }

    /// Checks the flags etcd checks at start.
    /// Whether a feature gate is on: `--feature-gates` (`Name=true,Other=false`) over etcd 3.6's
    /// defaults ([`keel_metrics::FEATURE_GATES`]).
    pub fn feature(&self, name: &str) -> bool {
        let Some((_, stage, default)) = keel_metrics::FEATURE_GATES.iter().find(|(n, _, _)| *n == name) else {
            return false;
        };
        let set = |gate: &str| {
            self.feature_gates
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| k.trim() == gate)
                .filter_map(|(_, v)| parse_go_bool(v.trim()))
                .next_back()
        };
        // A gate set by name wins; else AllAlpha or AllBeta sets every gate of its stage.
        let all = match *stage {
            "ALPHA" if name != "AllAlpha" => set("AllAlpha"),
            "BETA" if name != "AllBeta" => set("AllBeta"),
            _ => None,
        };
        set(name).or(all).unwrap_or(*default)
    }

    /// Entries kept for slow followers after a snapshot (5000 unless a flag says otherwise).
    pub fn snapshot_catchup_entries(&self) -> u64 {
        self.experimental_snapshot_catchup_entries.or(self.snapshot_catchup_entries).unwrap_or(5000)
    }

    /// The unary request duration above which a "request stats" warning is logged (300 ms).
    pub fn warning_unary_request_duration(&self) -> Duration {
        let v = given(&self.warning_unary_request_duration, &self.experimental_warning_unary_request_duration);
        parse_go_duration(v).unwrap_or(Duration::from_millis(300))
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(v) = &self.v2_deprecation {
            if !["write-only", "write-only-drop-data", "gone"].contains(&v.as_str()) {
                return Err(format!("invalid value {v:?} for flag -v2-deprecation: invalid value {v:?}"));
            }
        }
        // A flag and its experimental spelling both given is refused, as etcd 3.6 refuses it.
        for (flag, v, old) in [
            ("warning-unary-request-duration", &self.warning_unary_request_duration, &self.experimental_warning_unary_request_duration),
            ("watch-progress-notify-interval", &self.watch_progress_notify_interval, &self.experimental_watch_progress_notify_interval),
        ] {
            if !v.is_empty() && !old.is_empty() {
                return Err(format!("cannot set --experimental-{flag} and --{flag} at the same time"));
            }
        }
        for (flag, v) in [
            ("--watch-progress-notify-interval", &self.watch_progress_notify_interval),
            ("--experimental-watch-progress-notify-interval", &self.experimental_watch_progress_notify_interval),
            ("--compaction-sleep-interval", &self.compaction_sleep_interval),
            ("--corrupt-check-time", &self.corrupt_check_time),
            ("--compact-hash-check-time", &self.compact_hash_check_time),
            ("--warning-unary-request-duration", &self.warning_unary_request_duration),
            ("--experimental-warning-unary-request-duration", &self.experimental_warning_unary_request_duration),
        ] {
            if !v.is_empty() && parse_go_duration(v).is_none() {
                return Err(format!("invalid value {v:?} for {flag}: a duration such as 300ms"));
            }
        }
        if !self.compact_hash_check_time.is_empty() && self.compact_hash_check_time().is_zero() {
            return Err("--compact-hash-check-time must be >0 (set to 0s)".into());
        }
        for kv in self.feature_gates.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(format!("invalid value of --feature-gates: missing bool value for {kv}"));
            };
            if !keel_metrics::FEATURE_GATES.iter().any(|(n, _, _)| *n == k.trim()) {
                return Err(format!("invalid value of --feature-gates: unrecognized feature gate: {}", k.trim()));
            }
            if parse_go_bool(v.trim()).is_none() {
                return Err(format!(
                    "invalid value of --feature-gates: invalid value of {k}={v}, err: strconv.ParseBool: parsing {v:?}: invalid syntax"
                ));
            }
        }
        if self.heartbeat_interval == 0 {
            return Err("--heartbeat-interval must be > 0".into());
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            ));
        }
        if self.election_timeout > 50_000 {
            return Err(format!("--election-timeout[{}ms] is too long, and should be set less than 50000ms", self.election_timeout));
        }
        match self.initial_cluster_state.as_str() {
            "new" | "existing" => {}
            other => {
                return Err(format!("invalid value \"{other}\" for flag -initial-cluster-state: valid values are \"new\" and \"existing\""))
            }
        }
        if !self.data_dir().is_empty() && self.max_txn_ops == 0 {
            return Err("--max-txn-ops must be > 0".into());
        }
        Ok(())
    }
}

/// The value of a flag given in its etcd 3.7 spelling (`new`) or its experimental one.
fn given<'a>(new: &'a str, experimental: &'a str) -> &'a str {
    if new.is_empty() {
        experimental
    } else {
        new
    }
}

/// Go's `strconv.ParseBool`: 1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False.
pub fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Parses a Go duration such as `1h30m`, `10m`, `5s`, `500ms`, `+2s` or `0` (Go's
/// `time.ParseDuration`); a negative one, which no flag takes, is refused.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() || n == 'µ' {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        let secs = match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += v * secs;
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    // A value too large for a Duration is an invalid flag, not a panic.
    Duration::try_from_secs_f64(total).ok()
}

/// Splits a comma-separated URL list.
pub fn split_urls(s: &str) -> Vec<String> {
    s.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect()
}

/// Rewrites Go-style arguments for clap: `-flag` becomes `--flag`, and etcd flags Keel does not
/// know are removed (with their value). Returns the arguments and the removed flag names.
fn normalize_args(args: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut cmd = Config::command();
    cmd.build();
    let known: std::collections::HashSet<String> = cmd
        .get_arguments()
        .flat_map(|a| a.get_long().into_iter().chain(a.get_all_aliases().unwrap_or_default()).map(|s| s.to_string()).collect::<Vec<_>>())
        .chain(["help".to_string(), "version".to_string()])
        .collect();
    // Flags that take a value: as Go's flag package, the argument after one (without `=`) is its
    // value whatever it looks like (`--quota-backend-bytes -1`).
    let valued: std::collections::HashSet<String> = cmd
        .get_arguments()
        .filter(|a| a.get_action().takes_values() && a.get_num_args().is_none_or(|n| n.min_values() > 0))
        .flat_map(|a| a.get_long().into_iter().chain(a.get_all_aliases().unwrap_or_default()).map(|s| s.to_string()).collect::<Vec<_>>())
        .collect();
    let mut out = Vec::with_capacity(args.len());
    let mut ignored = Vec::new();
    let mut it = args.into_iter().peekable();
    if let Some(bin) = it.next() {
        out.push(bin);
    }
    while let Some(a) = it.next() {
        let body = if let Some(b) = a.strip_prefix("--") {
            b.to_string()
        } else if let Some(b) = a.strip_prefix('-') {
            if b.is_empty() {
                out.push(a);
                continue;
            }
            b.to_string()
        } else {
            out.push(a);
            continue;
        };
        let (name, has_value) = match body.split_once('=') {
            Some((n, _)) => (n.to_string(), true),
            None => (body.clone(), false),
        };
        if name == "h" && !has_value {
            // etcd's `-h`: the usage, not a server.
            out.push("--help".to_string());
            continue;
        }
        if known.contains(&name) {
            match it.peek() {
                Some(next) if !has_value && valued.contains(&name) => {
                    out.push(format!("--{body}={next}"));
                    it.next();
                }
                _ => out.push(format!("--{body}")),
            }
            continue;
        }
        ignored.push(name);
        if !has_value {
            if let Some(next) = it.peek() {
                if !next.starts_with('-') {
                    it.next();
                }
            }
        }
    }
    (out, ignored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(a: &[&str]) -> Config {
        let mut v = vec!["keel".to_string()];
        v.extend(a.iter().map(|s| s.to_string()));
        Config::parse_from_args(v).expect("parse")
    }

    /// `-h` and `--h` print the usage as etcd does (they were ignored as unknown flags and a
    /// server started).
    #[test]
    fn dash_h_asks_for_the_usage() {
        for h in ["-h", "--h", "-help", "--help"] {
            let e = Config::parse_from_args(vec!["keel".to_string(), h.to_string()]).expect_err(h);
            assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp, "{h}");
        }
    }

    /// Go's flag package takes the next argument as a number flag's value even when it starts
    /// with `-`: `--quota-backend-bytes -1` (the quota off) was refused as a missing value.
    #[test]
    fn negative_numbers_are_values_as_in_go() {
        assert_eq!(parse(&["--quota-backend-bytes", "-1"]).quota_backend_bytes, -1);
        assert_eq!(parse(&["--quota-backend-bytes=-1"]).quota_backend_bytes, -1);
    }

    /// etcd 3.7's gates: its list, Go's booleans, AllAlpha and AllBeta for the gates not named.
    #[test]
    fn feature_gates_as_etcd_3_7() {
        let c = parse(&[]);
        assert!(c.feature("FastLeaseKeepAlive") && c.feature("TxnModeWriteWithSharedBuffer"), "beta gates on by default");
        assert!(!c.feature("PriorityRequest") && !c.feature("LeaseCheckpoint"), "alpha gates off by default");
        let c = parse(&["--feature-gates=AllAlpha=true,LeaseCheckpoint=False,FastLeaseKeepAlive=0"]);
        assert!(c.validate().is_ok());
        assert!(c.feature("PriorityRequest") && c.feature("CompactHashCheck"), "AllAlpha turns on the alpha gates not named");
        assert!(!c.feature("LeaseCheckpoint"), "a gate named wins over AllAlpha");
        assert!(!c.feature("FastLeaseKeepAlive"), "Go's 0 is false");
        let c = parse(&["--feature-gates=AllBeta=F"]);
        assert!(!c.feature("FastLeaseKeepAlive") && !c.feature("TxnModeWriteWithSharedBuffer") && !c.feature("PriorityRequest"));
        for (gates, err) in [
            ("Nope=true", "invalid value of --feature-gates: unrecognized feature gate: Nope"),
            ("PriorityRequest", "invalid value of --feature-gates: missing bool value for PriorityRequest"),
            (
                "PriorityRequest=yes",
                "invalid value of --feature-gates: invalid value of PriorityRequest=yes, err: strconv.ParseBool: parsing \"yes\": invalid syntax",
            ),
        ] {
            assert_eq!(parse(&[&format!("--feature-gates={gates}")]).validate().unwrap_err(), err);
        }
    }

    #[test]
    fn repeated_flags_take_the_last_value_as_go_does() {
        let c = parse(&["--client-cert-auth", "--name", "a", "--client-cert-auth", "--name=b"]);
        assert!(c.client_cert_auth);
        assert_eq!(c.name, "b");
    }

    #[test]
    fn defaults_are_etcds() {
        let c = parse(&[]);
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir(), "default.etcd");
        assert_eq!(c.initial_cluster(), "default=http://localhost:2380");
        assert_eq!(c.snapshot_count, 10_000, "etcd 3.6's default");
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.max_txn_ops, 128);
        assert!(c.strict_reconfig_check);
        assert_eq!(c.request_timeout(), Duration::from_secs(7));
    }

    #[test]
    fn go_style_flags_and_unknown_flags() {
        let c = parse(&[
            "-name",
            "n1",
            "--peer-auto-tls",
            "--strict-reconfig-check=false",
            "--experimental-initial-corrupt-check",
            "--enable-pprof",
            "--auto-compaction-retention",
            "1h",
            "--snapshot-count=5",
        ]);
        assert_eq!(c.name, "n1");
        assert!(c.peer_auto_tls);
        assert!(!c.strict_reconfig_check);
        assert_eq!(c.snapshot_count, 5);
        assert_eq!(c.snapshot_catchup_entries(), 5000, "etcd's default");
        assert_eq!(parse(&["--experimental-snapshot-catchup-entries", "7"]).snapshot_catchup_entries(), 7);
        let both = parse(&["--experimental-snapshot-catchup-entries", "7", "--snapshot-catchup-entries", "9"]);
        assert_eq!(both.snapshot_catchup_entries(), 7, "etcd 3.6: the experimental flag, when given, wins");
        assert_eq!(c.initial_cluster(), "n1=http://localhost:2380");
    }

    #[test]
    fn a_flag_no_etcd_defines_is_refused_as_etcd_refuses_it() {
        let e = Config::parse_from_args(vec!["keel".into(), "--bogus-flag".into(), "1".into()]).unwrap_err();
        assert_eq!(e.to_string().trim_end(), "error: flag provided but not defined: -bogus-flag");
        assert!(e.use_stderr());
        // etcd flags Keel does not implement, of 3.4 to 3.7, are taken.
        for f in ["--enable-pprof", "--experimental-memory-mlock", "--log-package-levels=x", "--proxy=off"] {
            assert!(Config::parse_from_args(vec!["keel".into(), f.into()]).is_ok(), "{f}");
        }
    }

    #[test]
    fn corruption_check_flags_as_etcd_3_7_and_3_6() {
        let c = parse(&[]);
        assert_eq!((c.corrupt_check_time(), c.compact_hash_check_time()), (Duration::ZERO, Duration::from_secs(60)));
        assert!(!c.initial_corrupt_check() && !c.compact_hash_check());
        let c = parse(&["--corrupt-check-time", "2s", "--compact-hash-check-time=500ms", "--feature-gates=CompactHashCheck=true"]);
        assert_eq!((c.corrupt_check_time(), c.compact_hash_check_time()), (Duration::from_secs(2), Duration::from_millis(500)));
        assert!(c.compact_hash_check() && !c.initial_corrupt_check());
        let c = parse(&[
            "--experimental-corrupt-check-time",
            "3s",
            "--experimental-initial-corrupt-check",
            "--experimental-compact-hash-check-enabled",
        ]);
        assert_eq!(c.corrupt_check_time(), Duration::from_secs(3));
        assert!(c.initial_corrupt_check() && c.compact_hash_check());
        assert!(parse(&["--feature-gates", "InitialCorruptCheck=true"]).initial_corrupt_check());
        assert_eq!(parse(&["--compact-hash-check-time", "0"]).validate().unwrap_err(), "--compact-hash-check-time must be >0 (set to 0s)");
        assert!(parse(&["--corrupt-check-time", "soon"]).validate().is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("+2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_go_duration("-2s"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("9999999999999999999h"), None);
    }

    #[test]
    fn v2_deprecation_levels_as_etcd_3_6() {
        assert!(parse(&["--v2-deprecation", "write-only-drop-data"]).validate().is_ok());
        let e = parse(&["--v2-deprecation", "not-yet"]).validate().unwrap_err();
        assert_eq!(e, r#"invalid value "not-yet" for flag -v2-deprecation: invalid value "not-yet""#);
    }

    #[test]
    fn election_timeout_checked() {
        let c = parse(&["--heartbeat-interval", "100", "--election-timeout", "300"]);
        assert!(c.validate().is_err());
    }
}

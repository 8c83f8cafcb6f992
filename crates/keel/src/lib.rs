//! keel: the server. Parses etcd's flags, recovers or creates the member's state, starts raft and
//! the client listeners. A library so that fuzz targets can drive the request checks in-process;
//! the binary (`main.rs`) only calls [`main`].
//!
//! Module map (data flows down this list: gRPC/HTTP → server → raft → WAL → apply →
//! mvcc/lease/auth → watch):
//! - `member`: assembles one member (recover the data dir, start raft, bind listeners) and runs
//!   it until it stops.
//! - [`config`]: flags and `ETCD_*` variables.
//! - `serve`, `tls`, `h2fix`: listeners (TCP/unix, plain/TLS), connection bounds, HTTP/2
//!   settings, the `:authority` fix for etcdctl 3.4.
//! - `http`, [`api`], `gateway`: HTTP endpoints (`/health`, `/metrics`, ...), the gRPC services,
//!   the `/v3` JSON gateway.
//! - `server`: proposals, linearizable reads, quota, response headers (what handlers share).
//! - `peer`: the raft transport and the peer service (on a runtime of its own).
//! - `apply`: the state machine keel-raft's apply stage drives (MVCC writes, leases, auth,
//!   alarms, membership), and the callers waiting for their entries.
//! - `membership`: member and cluster IDs, the member list.
//! - `discovery`: etcd's v3 discovery (the initial cluster learned from another cluster).
//! - [`lease`]: the lease state (leases, TTLs, attached keys, deadlines), pure;
//!   `lease_duties`: the leader's renewals, TTL queries, expiry and checkpoints.
//! - `forwarded`: what followers forward to the leader over the peer service (promote, lease
//!   keep-alives and TTLs), answered by the server.
//! - [`auth`]: users, roles, permissions, tokens.
//! - `alarm`: NOSPACE and CORRUPT alarms.
//! - `watch`: the watch hub (synced watchers, catch-up from the store).
//! - `compactor`: auto compaction.
//! - `grpc_metrics`: the gRPC call metrics middleware (the families are keel-metrics').
//! - `migrate`: etcd's files in and out (bbolt backend, WAL, `.snap`; an etcd data dir converted
//!   at start).
//! - `errors`: etcd's gRPC errors.
//! - `logging`: the log, in etcd's JSON format.
//! - `proxy`: the L4 gateway (`keel gateway start`); `grpc_proxy`: the gRPC proxy (`keel
//!   grpc-proxy start`); `tool`: the offline tool (`keel snapshot ...`, `keel wal dump`).

mod alarm;
pub mod api;
mod apply;
pub mod auth;
mod compactor;
mod config;
mod discovery;
mod error;
mod errors;
mod forwarded;
mod gateway;
mod grpc_metrics;
mod grpc_proxy;
pub mod h2fix;
mod http;
pub mod lease;
mod lease_duties;
mod logging;
mod member;
mod membership;
pub mod migrate;
mod peer;
mod proxy;
mod serve;
mod server;
mod tls;
mod tool;
mod watch;

use config::Config;
use std::process::ExitCode;

/// The `keel` command: the server, or one of its tools (`keel snapshot ...`, `keel gateway ...`).
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    serve::raise_nofile_limit();
    if tool::is_tool(&args) {
        return tool::main(args);
    }
    if grpc_proxy::is_grpc_proxy(&args) {
        logging::init("info", "json");
        return grpc_proxy::main(args);
    }
    if proxy::is_gateway(&args) {
        logging::init("info", "json");
        return proxy::main(args);
    }
    if args.iter().skip(1).any(|a| a == "--version" || a == "-version") {
        // etcd's version lines (tools and etcd's own test harness read the first one), then
        // Keel's own.
        println!("etcd Version: {}", config::ETCD_VERSION);
        println!("Git SHA: keel {}", env!("CARGO_PKG_VERSION"));
        println!("Go Version: none (Keel is written in Rust)");
        println!(
            "Go OS/Arch: {}/{}",
            std::env::consts::OS,
            if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH }
        );
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    logging::init(&cfg.log_level, &cfg.log_format);
    cfg.warn_ignored();
    keel_metrics::configure(&keel_metrics::Settings {
        extensive: cfg.metrics == "extensive",
        warn_unary: cfg.warning_unary_request_duration(),
        feature: &|name| cfg.feature(name),
        server_version: config::ETCD_VERSION,
        cluster_version: config::ETCD_CLUSTER_VERSION,
    });
    keel_metrics::install_observers();
    // Crash points named in FAILPOINTS (test builds with `--features failpoints` only).
    #[cfg(feature = "failpoints")]
    let _failpoints = {
        let fp = std::env::var("FAILPOINTS").unwrap_or_default();
        if !fp.is_empty() {
            tracing::warn!(failpoints = %fp, "crash points armed");
        }
        fail::FailScenario::setup()
    };
    if let Err(e) = cfg.validate() {
        // Plain on stderr too, as Go's flag package reports a bad flag value.
        eprintln!("{e}");
        tracing::error!(error = %e, "invalid configuration");
        return ExitCode::from(1);
    }
    // Twice as many workers as cores (at least 4): a handler that keeps its worker busy (tonic
    // encoding a response of hundreds of MB) leaves others to run every other request, and the
    // kernel shares the cores among them, as Go's scheduler would.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads((2 * cores).max(4)).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    // Raft's peer traffic has a runtime of its own: a client request that keeps a worker of the
    // main runtime busy (decoding a huge range, say) cannot delay heartbeats and acknowledgements.
    let peer_rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("keel-peer").enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the peer runtime");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(member::run(cfg, peer_rt.handle().clone()));
    peer_rt.shutdown_background();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "keel stopped");
            ExitCode::from(1)
        }
    }
}

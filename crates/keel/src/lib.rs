//! keel: the `keel` binary. Parses etcd's flags, assembles one member from the crates below
//! (recovers or creates its state, starts raft, binds the listeners) and runs it, or runs one
//! of the tools. A library so that the binary (`main.rs`) only calls [`main`].
//!
//! Crates, in the direction calls go (gRPC/HTTP → server → raft → WAL → apply →
//! mvcc/lease/auth → watch):
//! - keel-api: gRPC services, request checks, etcd's error codes, the JSON gateway, HTTP
//!   endpoints, listeners, TLS.
//! - keel-server: proposals, linearizable reads, quota, the state machine (apply), membership,
//!   alarms, auto compaction, the leader's lease duties, the peer transport, discovery.
//! - keel-raft (raft-rs, the raft and apply stages), keel-wal (the log, snapshots).
//! - keel-mvcc (the store on redb, the watch hub), keel-lease, keel-auth.
//! - keel-migrate: etcd's files in and out; keel-proxy: etcd's gateway and gRPC proxy.
//! - keel-config: flags and `ETCD_*` variables; keel-metrics: the metric families.
//!
//! Modules here:
//! - `member`: assembles one member and runs it until it stops.
//! - `logging`: the log, in etcd's JSON format.
//! - `memory`: freed memory handed back to the OS (at start, and as threads go idle).
//! - `tool`: the offline tool (`keel snapshot ...`, `keel wal dump`).

mod logging;
mod member;
mod memory;
mod tool;

use config::Config;
use keel_api::serve;
use keel_config as config;
use keel_proxy::{grpc_proxy, proxy};
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads((2 * cores).max(4))
        .on_thread_park(memory::release_when_idle)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    // Raft's peer traffic has a runtime of its own: a client request that keeps a worker of the
    // main runtime busy (decoding a huge range, say) cannot delay heartbeats and acknowledgements.
    let peer_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("keel-peer")
        .on_thread_park(memory::release_when_idle)
        .enable_all()
        .build()
    {
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

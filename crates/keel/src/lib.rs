//! keel: the server. Parses etcd's flags, recovers or creates the member's state, starts raft and
//! the client listeners. A library so that fuzz targets can drive the request checks in-process;
//! the binary (`main.rs`) only calls [`main`].
//!
//! Module map (data flows down this list: gRPC/HTTP → server → raft → WAL → apply →
//! mvcc/lease/auth → watch):
//! - [`config`]: flags and `ETCD_*` variables.
//! - `serve`, `tls`, `h2fix`: listeners (TCP/unix, plain/TLS), HTTP/2 settings, the `:authority`
//!   fix for etcdctl 3.4.
//! - `http`, [`api`], `gateway`: HTTP endpoints (`/health`, `/metrics`, ...), the gRPC services,
//!   the `/v3` JSON gateway.
//! - `server`: proposals, linearizable reads, quota, response headers (what handlers share).
//! - `peer`: the raft transport and the peer service (on a runtime of its own).
//! - `apply`: the state machine keel-raft's apply stage drives (MVCC writes, leases, auth,
//!   alarms, membership), and the callers waiting for their entries.
//! - `membership`: member and cluster IDs, the member list.
//! - [`lease`]: leases: state, renewals, expiry, checkpoints.
//! - [`auth`]: users, roles, permissions, tokens.
//! - `alarm`: NOSPACE and CORRUPT alarms.
//! - `watch`: the watch hub (synced watchers, catch-up from the store).
//! - `compactor`: auto compaction.
//! - `metrics`: Prometheus metrics with etcd's names.
//! - `errors`: etcd's gRPC errors.
//! - `proxy`: the L4 gateway (`keel gateway start`); `tool`: the offline tool (`keel snapshot
//!   ...`, `keel wal dump`).

mod alarm;
pub mod api;
mod apply;
pub mod auth;
mod compactor;
mod config;
mod errors;
mod gateway;
mod h2fix;
mod http;
pub mod lease;
mod membership;
mod metrics;
mod peer;
mod proxy;
mod serve;
mod server;
mod tls;
mod tool;
mod watch;

use anyhow::{bail, Context, Result};
use apply::{Applier, Waiters};
use config::{split_urls, Config};
use keel_mvcc::Store;
use keel_proto::etcdserverpb::auth_server::AuthServer;
use keel_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::lease_server::LeaseServer;
use keel_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_proto::etcdserverpb::watch_server::WatchServer;
use keel_proto::keelpb::peer_server::PeerServer;
use keel_proto::keelpb::{internal_request::Request, MemberAttributes};
use keel_proto::v3electionpb::election_server::ElectionServer;
use keel_proto::v3lockpb::lock_server::LockServer;
use keel_raft::{Disk, Identity, NodeConfig};
use membership::{Members, AUX_MEMBERS};
use prost::Message;
use server::Server;
use std::path::Path;
use std::process::ExitCode;

use parking_lot::RwLock;
use std::sync::Arc;
use std::time::Duration;

fn init_logging(level: &str) {
    let level = match level {
        "debug" => "debug",
        "warn" => "warn",
        "error" | "panic" | "fatal" | "dpanic" => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}

/// The `keel` command: the server, or one of its tools (`keel snapshot ...`, `keel gateway ...`).
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if tool::is_tool(&args) {
        return tool::main(args);
    }
    if proxy::is_gateway(&args) {
        init_logging("info");
        return proxy::main(args);
    }
    let cfg = match Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logging(&cfg.log_level);
    metrics::install_observers();
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
    let peer_rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("keel-peer").enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the peer runtime");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(run(cfg, peer_rt.handle().clone()));
    peer_rt.shutdown_background();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "keel stopped");
            ExitCode::from(1)
        }
    }
}

/// Who this member is and how its log starts, decided from the flags for a member that never
/// ran (a persisted member keeps what its WAL says).
struct Bootstrap {
    identity: Identity,
    /// Initial log entries (new cluster only): (member ID, conf change context).
    entries: Vec<(u64, Vec<u8>)>,
    members: Members,
}

async fn bootstrap(cfg: &Config, initial: &Members, dialer: &peer::Dialer) -> Result<Bootstrap> {
    let mut mine = split_urls(&cfg.initial_advertise_peer_urls);
    mine.sort();
    if cfg.initial_cluster_state == "existing" {
        // Join: the cluster already added this member (etcdctl member add); learn its ID from the
        // other members.
        let others: Vec<String> = initial.members.iter().flat_map(|m| m.peer_urls.clone()).filter(|u| !mine.contains(u)).collect();
        let data = peer::fetch_members(dialer, &others).await?;
        let me = data
            .members
            .iter()
            .find(|m| {
                let mut u = m.peer_urls.clone();
                u.sort();
                u == mine
            })
            .ok_or_else(|| {
                anyhow::anyhow!("no member with peer URLs {} in the cluster; add it first (etcdctl member add)", mine.join(","))
            })?;
        tracing::info!(member_id = format!("{:x}", me.id), cluster_id = format!("{:x}", data.cluster_id), "joining an existing cluster");
        return Ok(Bootstrap {
            identity: Identity { cluster_id: data.cluster_id, member_id: me.id, initial_voters: vec![] },
            entries: vec![],
            members: Members { cluster_id: data.cluster_id, members: data.members },
        });
    }
    let me = initial
        .members
        .iter()
        .find(|m| m.name == cfg.name)
        .ok_or_else(|| anyhow::anyhow!("couldn't find local name {:?} in the initial cluster configuration", cfg.name))?;
    let mut have = me.peer_urls.clone();
    have.sort();
    if have != mine {
        bail!(
            "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} (advertise peer URLs must match the initial cluster)",
            cfg.name,
            have.join(","),
            mine.join(",")
        );
    }
    let entries = initial
        .members
        .iter()
        .map(|m| (m.id, keel_proto::keelpb::ConfChangeContext { request_id: 0, member: Some(m.clone()) }.encode_to_vec()))
        .collect();
    Ok(Bootstrap {
        identity: Identity {
            cluster_id: initial.cluster_id,
            member_id: me.id,
            initial_voters: initial.members.iter().map(|m| m.id).collect(),
        },
        entries,
        members: initial.clone(),
    })
}

async fn run(cfg: Config, peer_rt: tokio::runtime::Handle) -> Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), etcd_api = config::ETCD_VERSION, name = %cfg.name, data_dir = %cfg.data_dir(), "starting keel");
    let keepalive = |flag: &str, v: &str| config::parse_go_duration(v).ok_or_else(|| anyhow::anyhow!("invalid {flag} {v:?}"));
    let ka_interval = keepalive("--grpc-keepalive-interval", &cfg.grpc_keepalive_interval)?;
    let ka_timeout = keepalive("--grpc-keepalive-timeout", &cfg.grpc_keepalive_timeout)?;
    keepalive("--grpc-keepalive-min-time", &cfg.grpc_keepalive_min_time)?;
    let client_h2 = serve::H2 {
        max_streams: cfg.max_concurrent_streams,
        keepalive: (!ka_interval.is_zero()).then_some((ka_interval, ka_timeout.max(std::time::Duration::from_secs(1)))),
    };
    let auto_compaction = compactor::policy(&cfg.auto_compaction_mode, &cfg.auto_compaction_retention).map_err(anyhow::Error::msg)?;
    let snap_dir = cfg.snap_dir();
    let wal_dir = cfg.wal_dir();
    std::fs::create_dir_all(&snap_dir).with_context(|| format!("create {snap_dir}"))?;

    let initial = Members::from_initial_cluster(&cfg.initial_cluster(), &cfg.initial_cluster_token).map_err(anyhow::Error::msg)?;
    let dialer = peer::Dialer::new(tls::peer_client(&cfg)?, cfg.member_local_ip());
    let existed = Disk::exists(Path::new(&wal_dir));
    let boot = if existed {
        Bootstrap { identity: Identity { cluster_id: 0, member_id: 0, initial_voters: vec![] }, entries: vec![], members: initial.clone() }
    } else {
        bootstrap(&cfg, &initial, &dialer).await?
    };

    let db_path = Path::new(&snap_dir).join("db");
    let mut store = Store::open(&db_path).context("open backend")?;
    let disk = Disk::open(Path::new(&wal_dir), Path::new(&snap_dir), boot.identity.clone(), &boot.entries).context("open WAL")?;
    let identity = disk.identity.clone();
    if existed {
        tracing::info!(
            member_id = format!("{:x}", identity.member_id),
            cluster_id = format!("{:x}", identity.cluster_id),
            "restarting member"
        );
    } else {
        tracing::info!(
            member_id = format!("{:x}", identity.member_id),
            cluster_id = format!("{:x}", identity.cluster_id),
            "starting a new member"
        );
    }

    // Membership: the backend's record, else the snapshot's, else the bootstrap's.
    let members = if let Some(b) = store.aux(AUX_MEMBERS) {
        Members::decode(b).map_err(anyhow::Error::msg)?
    } else if let Some(s) = disk.snapshot.as_ref().filter(|s| !s.get_data().is_empty()) {
        Members::decode(s.get_data()).map_err(anyhow::Error::msg)?
    } else {
        store.set_aux(AUX_MEMBERS, boot.members.encode());
        store.commit().context("backend commit")?;
        boot.members.clone()
    };
    if members.cluster_id != identity.cluster_id {
        bail!("cluster ID mismatch: the backend belongs to cluster {:x}, the WAL to {:x}", members.cluster_id, identity.cluster_id);
    }

    let mut lessor = lease::Lessor::default();
    apply::load_leases(&store, &mut lessor);
    let lessor = Arc::new(parking_lot::Mutex::new(lessor));
    let auth = Arc::new(RwLock::new(auth::AuthStore::load(&store)));
    let alarms = Arc::new(RwLock::new(alarm::Alarms::load(&store)));
    let tokens = Arc::new(
        auth::Tokens::from_flag(&cfg.auth_token, std::time::Duration::from_secs(cfg.auth_token_ttl.max(1)))
            .map_err(|e| anyhow::anyhow!("--auth-token: {e}"))?,
    );
    if !(4..=31).contains(&cfg.bcrypt_cost) {
        bail!("--bcrypt-cost {} is out of range (4..=31)", cfg.bcrypt_cost);
    }
    let store = Arc::new(keel_mvcc::SharedStore::new(store));
    let members = Arc::new(RwLock::new(members));
    let waiters = Arc::new(Waiters::default());
    let removed = Arc::new(tokio::sync::Notify::new());
    let transport =
        peer::PeerTransport::new(identity.member_id, identity.cluster_id, members.clone(), store.clone(), dialer, peer_rt.clone());
    let node_status = Arc::new(keel_raft::NodeStatus::default());
    let hub =
        watch::WatchHub::new(store.clone(), node_status.clone(), identity.cluster_id, identity.member_id, cfg.max_request_bytes as usize);
    let applier = Applier {
        store: store.clone(),
        hub: hub.clone(),
        lessor: lessor.clone(),
        members: members.clone(),
        waiters: waiters.clone(),
        member_id: identity.member_id,
        db_path: db_path.clone(),
        removed: removed.clone(),
        auth: auth.clone(),
        tokens: tokens.clone(),
        alarms: alarms.clone(),
        commit_now: std::cell::Cell::new(false),
    };
    let node_cfg = NodeConfig {
        id: identity.member_id,
        tick: cfg.heartbeat(),
        election_ticks: (cfg.election_timeout / cfg.heartbeat_interval).max(2) as usize,
        snapshot_count: cfg.snapshot_count.max(1),
        catchup_entries: 5000,
    };
    let (node, join) = keel_raft::node::start(node_cfg, disk, applier, transport.clone(), node_status).map_err(anyhow::Error::msg)?;
    transport.set_node(node.clone());
    transport.keep_connected();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<bool>();
    std::thread::spawn(move || {
        let ok = matches!(join.join(), Ok(Ok(())));
        if stopped_tx.send(ok).is_err() || !ok {
            std::process::exit(if ok { 0 } else { 1 });
        }
    });

    let server = Server::new(
        cfg.clone(),
        identity.member_id,
        identity.cluster_id,
        store,
        members.clone(),
        lessor,
        node.clone(),
        waiters,
        auth,
        tokens,
        alarms,
    );

    // Peer listeners.
    let peer_tls = tls::peer_server(&cfg)?;
    let peer_router = tonic::service::Routes::new(
        PeerServer::new(peer::PeerService {
            cluster_id: identity.cluster_id,
            node: node.clone(),
            members: members.clone(),
            snap_dir: Path::new(&snap_dir).to_path_buf(),
            forwarded: server.clone(),
        })
        .max_decoding_message_size(peer::MAX_PEER_MESSAGE)
        .max_encoding_message_size(peer::MAX_PEER_MESSAGE),
    )
    .into_axum_router();
    // Bound and served on the peer runtime; binding errors come back here.
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let peer_urls = split_urls(&cfg.listen_peer_urls);
    peer_rt.spawn(async move {
        let listeners = match serve::bind(&peer_urls).await {
            Ok(l) => l,
            Err(e) => {
                let _ = bound_tx.send(Err(e));
                return;
            }
        };
        let mut serving = Vec::new();
        for (lu, l) in listeners {
            let acceptor = match (lu.tls, &peer_tls) {
                (true, Some(t)) => Some(t.clone()),
                (true, None) => {
                    let _ = bound_tx.send(Err(anyhow::anyhow!(
                        "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url {} with HTTPS scheme",
                        lu.url
                    )));
                    return;
                }
                (false, _) => None,
            };
            tracing::info!(address = %lu.addr, tls = lu.tls, "serving peer traffic on {}", lu.url);
            serving.push(tokio::spawn(serve::serve(l, acceptor, peer_router.clone(), serve::H2::DEFAULT, false)));
        }
        let _ = bound_tx.send(Ok(()));
        for s in serving {
            let _ = s.await;
        }
    });
    bound_rx.await.map_err(|_| anyhow::anyhow!("the peer runtime stopped"))??;

    // Client listeners.
    let max_recv = cfg.max_request_bytes as usize + 512 * 1024;
    // etcd's `hasleader` metadata: such a request fails at once when there is no leader.
    let gate = {
        let status = node.status.clone();
        move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
            let wants = req.metadata().get("hasleader").map(|v| v.as_bytes() == b"true").unwrap_or(false);
            if wants && status.leader() == 0 {
                return Err(tonic::Status::unavailable("etcdserver: no leader"));
            }
            Ok(req)
        }
    };
    use tonic::service::interceptor::InterceptedService as Gated;
    let grpc = tonic::service::Routes::new(Gated::new(
        KvServer::new(api::kv::KvService { server: server.clone() })
            .max_decoding_message_size(max_recv)
            .max_encoding_message_size(usize::MAX),
        gate.clone(),
    ))
    .add_service(Gated::new(
        MaintenanceServer::new(api::maintenance::MaintenanceService { server: server.clone() }).max_decoding_message_size(max_recv),
        gate.clone(),
    ))
    .add_service(Gated::new(
        ClusterServer::new(api::cluster::ClusterService { server: server.clone(), transport: transport.clone() })
            .max_decoding_message_size(max_recv),
        gate.clone(),
    ))
    .add_service(Gated::new(LockServer::new(api::concurrency::Concurrency { server: server.clone(), hub: hub.clone() }), gate.clone()))
    .add_service(Gated::new(ElectionServer::new(api::concurrency::Concurrency { server: server.clone(), hub: hub.clone() }), gate.clone()))
    .add_service(Gated::new(
        WatchServer::new(api::watch::WatchService {
            server: server.clone(),
            hub: hub.clone(),
            next_stream: 0.into(),
            progress_interval: cfg.watch_progress_notify_interval(),
        })
        .max_decoding_message_size(max_recv),
        gate.clone(),
    ))
    .add_service(Gated::new(
        AuthServer::new(api::auth::AuthService { server: server.clone() }).max_decoding_message_size(max_recv),
        gate.clone(),
    ))
    .add_service(Gated::new(
        LeaseServer::new(api::lease::LeaseService { server: server.clone(), transport: transport.clone() })
            .max_decoding_message_size(max_recv),
        gate,
    ));
    let gw = Arc::new(gateway::Gateway {
        kv: api::kv::KvService { server: server.clone() },
        lease: api::lease::LeaseService { server: server.clone(), transport: transport.clone() },
        cluster: api::cluster::ClusterService { server: server.clone(), transport: transport.clone() },
        maintenance: api::maintenance::MaintenanceService { server: server.clone() },
        concurrency: api::concurrency::Concurrency { server: server.clone(), hub: hub.clone() },
        auth: api::auth::AuthService { server: server.clone() },
        hub: hub.clone(),
        next_stream: 0.into(),
        streams: Arc::new(tokio::sync::Semaphore::new((cfg.max_concurrent_streams as usize).min(tokio::sync::Semaphore::MAX_PERMITS))),
    });
    let router = grpc
        .into_axum_router()
        .layer(axum::middleware::from_fn(errors::grpc_compat))
        .layer(axum::middleware::from_fn(metrics::grpc_layer))
        .merge(http::router(server.clone()))
        .merge(gateway::router(gw));
    let client_tls = tls::client_server(&cfg)?;
    // As etcd: the client ports are bound now but served only once this member is ready (its
    // attributes published through raft, so every entry before them is applied). Serving
    // earlier would show a restarted member's pre-replay state: a revision older than writes
    // it had acknowledged.
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    for (lu, l) in serve::bind(&split_urls(&cfg.listen_client_urls)).await? {
        let acceptor = match (lu.tls, &client_tls) {
            (true, Some(t)) => Some(t.clone()),
            (true, None) => bail!("TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme", lu.url),
            (false, _) => None,
        };
        let (router, mut ready) = (router.clone(), ready_rx.clone());
        tokio::spawn(async move {
            if ready.wait_for(|r| *r).await.is_err() {
                return;
            }
            tracing::info!(address = %lu.addr, tls = lu.tls, "serving client traffic on {}", lu.url);
            serve::serve(l, acceptor, router, client_h2, true).await
        });
    }
    if let Some(urls) = cfg.listen_metrics_urls.as_deref().filter(|u| !u.is_empty()) {
        let mrouter = http::metrics_router(server.clone());
        for (lu, l) in serve::bind(&split_urls(urls)).await? {
            let acceptor = match (lu.tls, &client_tls) {
                (true, Some(t)) => Some(t.clone()),
                (true, None) => {
                    bail!("TLS key/cert (--cert-file, --key-file) must be provided for metrics url {} with HTTPS scheme", lu.url)
                }
                (false, _) => None,
            };
            tracing::info!(address = %lu.addr, "serving metrics on {}", lu.url);
            tokio::spawn(serve::serve(l, acceptor, mrouter.clone(), serve::H2::DEFAULT, false));
        }
    }

    tokio::spawn(publish(server.clone(), ready_tx));
    tokio::spawn(compactor::run(server.clone(), auto_compaction));
    tokio::spawn(lease::run(server.clone()));

    tokio::select! {
        _ = wait_for_shutdown() => tracing::info!("received a stop signal; stopping"),
        _ = removed.notified() => tracing::warn!("this member was removed from the cluster; stopping"),
    }
    node.stop();
    // The node hands leadership off and syncs the backend before it ends.
    let limit = Duration::from_millis(cfg.election_timeout * 2) + Duration::from_secs(2);
    if tokio::time::timeout(limit, stopped_rx).await.is_err() {
        tracing::warn!("raft node did not stop in time");
    }
    Ok(())
}

/// Publishes this member's name and client URLs through raft (as etcd does), then announces that
/// the member serves.
async fn publish(server: Arc<Server>, ready: tokio::sync::watch::Sender<bool>) {
    let attrs = MemberAttributes {
        id: server.member_id,
        name: server.cfg.name.clone(),
        client_urls: split_urls(&server.cfg.advertise_client_urls),
    };
    loop {
        if server.node.status.leader() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        match server.propose(Request::MemberAttributes(attrs.clone())).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e.message(), "failed to publish local member to cluster through raft; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    tracing::info!(cluster_version = config::ETCD_CLUSTER_VERSION, "enabled capabilities for version 3.4");
    tracing::info!(
        local_member_id = format!("{:x}", server.member_id),
        name = %attrs.name,
        client_urls = ?attrs.client_urls,
        "published local member to cluster through raft"
    );
    let _ = ready.send(true);
    tracing::info!("ready to serve client requests");
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

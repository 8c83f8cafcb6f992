//! keel: the server binary. Parses etcd's flags, recovers or creates the member's state, starts
//! raft and the client listeners.
//!
//! Module map (data flows down this list):
//! - [`config`]: flags and `ETCD_*` variables.
//! - [`serve`], [`http`], [`api`]: listeners, HTTP endpoints, gRPC services.
//! - [`server`]: proposals, linearizable reads, response headers.
//! - [`apply`]: the state machine raft drives (MVCC writes, membership).
//! - [`membership`]: member and cluster IDs, the member list.
//! - [`errors`]: etcd's gRPC errors.

mod api;
mod apply;
mod config;
mod errors;
mod http;
mod membership;
mod serve;
mod server;

use anyhow::{bail, Context, Result};
use apply::{Applier, Waiters};
use config::{split_urls, Config};
use keel_mvcc::Store;
use keel_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_proto::keelpb::{internal_request::Request, MemberAttributes};
use keel_raft::{Disk, Identity, NodeConfig};
use membership::{Members, AUX_MEMBERS};
use server::Server;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

fn init_logging(level: &str) {
    let level = match level {
        "debug" => "debug",
        "warn" => "warn",
        "error" | "panic" | "fatal" | "dpanic" => "error",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn main() -> ExitCode {
    let cfg = match Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(&cfg.log_level);
    if let Err(e) = cfg.validate() {
        tracing::error!(error = %e, "invalid configuration");
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "keel stopped");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: Config) -> Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), etcd_api = config::ETCD_VERSION, name = %cfg.name, data_dir = %cfg.data_dir(), "starting keel");
    let snap_dir = cfg.snap_dir();
    let wal_dir = cfg.wal_dir();
    std::fs::create_dir_all(&snap_dir).with_context(|| format!("create {snap_dir}"))?;

    // Identity: from the WAL if this member ran before, else from the bootstrap flags.
    let initial = Members::from_initial_cluster(&cfg.initial_cluster(), &cfg.initial_cluster_token)
        .map_err(anyhow::Error::msg)?;
    let existed = Disk::exists(Path::new(&wal_dir));
    let me = initial.members.iter().find(|m| m.name == cfg.name);
    let member_id = match me {
        Some(m) => {
            let mut want = split_urls(&cfg.initial_advertise_peer_urls);
            want.sort();
            let mut have = m.peer_urls.clone();
            have.sort();
            if want != have && !existed {
                bail!(
                    "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} (advertise peer URLs must match the initial cluster)",
                    cfg.name,
                    have.join(","),
                    want.join(",")
                );
            }
            m.id
        }
        None if existed => 0,
        None => bail!(
            "couldn't find local name {:?} in the initial cluster configuration",
            cfg.name
        ),
    };
    if cfg.initial_cluster_state == "existing" && !existed {
        bail!(
            "joining an existing cluster (--initial-cluster-state=existing) is not supported yet"
        );
    }
    let identity = Identity {
        cluster_id: initial.cluster_id,
        member_id,
        initial_voters: initial.members.iter().map(|m| m.id).collect(),
    };

    let store = Store::open(&Path::new(&snap_dir).join("db")).context("open backend")?;
    let disk = Disk::open(Path::new(&wal_dir), Path::new(&snap_dir), identity.clone())
        .context("open WAL")?;
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

    // Membership: the backend's record, else the snapshot's, else the bootstrap flags.
    let mut store = store;
    let members = if let Some(b) = store.aux(AUX_MEMBERS) {
        Members::decode(b).map_err(anyhow::Error::msg)?
    } else if let Some(s) = disk.snapshot.as_ref().filter(|s| !s.get_data().is_empty()) {
        Members::decode(s.get_data()).map_err(anyhow::Error::msg)?
    } else {
        store.set_aux(AUX_MEMBERS, initial.encode());
        store.commit().context("backend commit")?;
        initial.clone()
    };
    if members.cluster_id != identity.cluster_id {
        bail!(
            "cluster ID mismatch: the backend belongs to cluster {:x}, the WAL to {:x}",
            members.cluster_id,
            identity.cluster_id
        );
    }

    let store = Arc::new(RwLock::new(store));
    let members = Arc::new(RwLock::new(members));
    let waiters = Arc::new(Waiters::default());
    let applier = Applier {
        store: store.clone(),
        members: members.clone(),
        waiters: waiters.clone(),
    };
    let node_cfg = NodeConfig {
        id: identity.member_id,
        tick: cfg.heartbeat(),
        election_ticks: (cfg.election_timeout / cfg.heartbeat_interval).max(2) as usize,
        snapshot_count: cfg.snapshot_count.max(1),
        catchup_entries: 5000,
    };
    let (node, join) =
        keel_raft::node::start(node_cfg, disk, applier, keel_raft::node::NoTransport)
            .map_err(anyhow::Error::msg)?;
    std::thread::spawn(move || {
        let code = match join.join() {
            Ok(Ok(())) => 0,
            _ => 1,
        };
        if code != 0 {
            std::process::exit(code);
        }
    });

    let server = Arc::new(Server::new(
        cfg.clone(),
        identity.member_id,
        identity.cluster_id,
        store,
        members,
        node.clone(),
        waiters,
    ));

    // Client listeners.
    let max_recv = cfg.max_request_bytes as usize + 512 * 1024;
    let grpc = tonic::service::Routes::new(
        KvServer::new(api::kv::KvService {
            server: server.clone(),
        })
        .max_decoding_message_size(max_recv)
        .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        MaintenanceServer::new(api::maintenance::MaintenanceService {
            server: server.clone(),
        })
        .max_decoding_message_size(max_recv),
    )
    .add_service(
        ClusterServer::new(api::cluster::ClusterService {
            server: server.clone(),
        })
        .max_decoding_message_size(max_recv),
    );
    let router = grpc.into_axum_router().merge(http::router(server.clone()));
    let tls = serve::client_tls(&cfg)?;
    let listeners = serve::bind(&split_urls(&cfg.listen_client_urls)).await?;
    for (lu, l) in listeners {
        let acceptor = if lu.tls {
            match &tls {
                Some(t) => Some(t.clone()),
                None => bail!("TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme", lu.url),
            }
        } else {
            None
        };
        tracing::info!(address = %lu.addr, tls = lu.tls, "serving client traffic on {}", lu.url);
        tokio::spawn(serve::serve(
            l,
            acceptor,
            router.clone(),
            cfg.max_concurrent_streams,
        ));
    }

    tokio::spawn(publish(server.clone()));

    wait_for_shutdown().await;
    tracing::info!("received a stop signal; stopping");
    node.stop();
    Ok(())
}

/// Publishes this member's name and client URLs through raft (as etcd does), then announces that
/// the member serves.
async fn publish(server: Arc<Server>) {
    let attrs = MemberAttributes {
        id: server.member_id,
        name: server.cfg.name.clone(),
        client_urls: split_urls(&server.cfg.advertise_client_urls),
    };
    loop {
        match server
            .propose(Request::MemberAttributes(attrs.clone()))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e.message(), "failed to publish local member to cluster through raft; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    tracing::info!(
        cluster_version = config::ETCD_CLUSTER_VERSION,
        "enabled capabilities for version 3.5"
    );
    tracing::info!(
        local_member_id = format!("{:x}", server.member_id),
        name = %attrs.name,
        client_urls = ?attrs.client_urls,
        "published local member to cluster through raft"
    );
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

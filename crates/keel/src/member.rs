//! member: assembles one member from its flags and runs it. The steps, in order: the peer and
//! client listeners are bound (`Listeners`); [`Member::start`] recovers (or creates) the data dir's
//! state and starts raft and its apply stage; `Member::serve_peers` serves the peer listeners on
//! the peer runtime; `Member::serve_clients` serves the client listeners (once the member has
//! published itself) and binds and serves the metrics listeners; [`Member::run`] starts the
//! background duties (publish, auto compaction, leases) and waits for a stop signal or this
//! member's removal, then stops raft.
//!
//! Calls everything below it in the module map (server, peer, raft, mvcc, apply, watch, lease,
//! auth, alarm); nothing calls it but `main`.

use anyhow::{bail, Context, Result};
use keel_api::{api, errors, forwarded, gateway, grpc_metrics, http, serve, tls};
use keel_auth as auth;
use keel_config::{self as config, split_urls, Config};
use keel_lease as lease;
use keel_mvcc::watch;
use keel_mvcc::{SharedStore, Store};
use keel_proto::etcdserverpb::auth_server::AuthServer;
use keel_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::lease_server::LeaseServer;
use keel_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_proto::etcdserverpb::watch_server::WatchServer;
use keel_proto::keelpb::{internal_raft_request::Request, ClusterMemberAttrSetRequest, MemberAttributes};
use keel_proto::v3electionpb::election_server::ElectionServer;
use keel_proto::v3lockpb::lock_server::LockServer;
use keel_raft::{Disk, Identity, NodeConfig, NodeHandle};
use keel_server::apply::{Applier, State, Waiters};
use keel_server::membership::{Members, AUX_MEMBERS};
use keel_server::server::Server;
use keel_server::{alarm, compactor, lease_duties, peer};
use parking_lot::RwLock;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Starts a member from `cfg` and runs it until it is stopped or removed.
pub async fn run(cfg: Config, peer_rt: tokio::runtime::Handle) -> Result<()> {
    let bound = Listeners::bind(&cfg)?;
    let member = Member::start(cfg, peer_rt).await?;
    member.serve_peers(bound.peers).await?;
    // As etcd: a member that ran before compares its data with its peers' before it serves
    // (a new member has nothing to compare).
    if member.initialized && member.cfg.initial_corrupt_check() {
        if let Err(e) = keel_server::corruption::initial_check(&member.server, &member.transport).await {
            tracing::error!(error = %e, "checkInitialHashKV failed");
            anyhow::bail!(e);
        }
    }
    member.serve_clients(bound.clients, bound.client_http).await?;
    member.run().await
}

/// The peer and client listeners, bound before anything else, as etcd binds them before it
/// reads its data dir: a port in use fails the start at once, not after the key index of a big
/// store is loaded, and a client or peer connecting during a long start waits in the
/// listener's backlog (answered once the member serves) instead of being refused and backing
/// off. The metrics listeners are bound when they are served.
struct Listeners {
    peers: Vec<(serve::ListenUrl, serve::Bound)>,
    clients: Vec<(serve::ListenUrl, serve::Bound)>,
    /// `--listen-client-http-urls`.
    client_http: Vec<(serve::ListenUrl, serve::Bound)>,
}

impl Listeners {
    fn bind(cfg: &Config) -> Result<Listeners> {
        Ok(Listeners {
            peers: serve::bind_now(&split_urls(&cfg.listen_peer_urls))?,
            clients: serve::bind_now(&split_urls(&cfg.listen_client_urls))?,
            client_http: serve::bind_now(&split_urls(&cfg.listen_client_http_urls))?,
        })
    }
}

/// A started member: raft runs, the server answers; listeners are added by the steps below.
pub struct Member {
    cfg: Config,
    peer_rt: tokio::runtime::Handle,
    server: Arc<Server>,
    node: NodeHandle,
    transport: keel_server::rafthttp::Transport,
    hub: Arc<watch::WatchHub>,
    /// Told when an applied entry removed this member.
    removed: Arc<tokio::sync::Notify>,
    /// The node thread's end (true: a clean stop).
    stopped: tokio::sync::oneshot::Receiver<bool>,
    /// Set once the member published itself: the client listeners serve from then on.
    ready: tokio::sync::watch::Sender<bool>,
    /// The member ran before (its data dir had a WAL).
    initialized: bool,
}

/// The data dir as found (or made) at start, before raft runs.
struct Recovered {
    disk: Disk,
    store: Store,
    members: Members,
    db_path: PathBuf,
    dialer: peer::Dialer,
}

impl Member {
    /// Recovers the member's state from its data dir (a new member: from the flags, or from the
    /// cluster it joins), loads leases, auth and alarms from the backend, and starts raft with
    /// its apply stage.
    pub async fn start(cfg: Config, peer_rt: tokio::runtime::Handle) -> Result<Member> {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            etcd_version = config::ETCD_VERSION,
            name = %cfg.name,
            data_dir = %cfg.data_dir(),
            snapshot_count = cfg.snapshot_count,
            snapshot_catchup_entries = cfg.snapshot_catchup_entries(),
            // etcd 3.6 always runs at this level of v2 deprecation, whatever the flag says.
            v2_deprecation = "write-only",
            "starting keel"
        );
        if !(4..=31).contains(&cfg.bcrypt_cost) {
            bail!("--bcrypt-cost {} is out of range (4..=31)", cfg.bcrypt_cost);
        }
        let rec = recover(&cfg).await?;
        let identity = rec.disk.identity.clone();
        let initialized = !rec.disk.fresh;
        let tokens = auth::Tokens::from_flag(&cfg.auth_token, Duration::from_secs(cfg.auth_token_ttl.max(1)))
            .map_err(|e| anyhow::anyhow!("--auth-token: {e}"))?;
        let state = load_state(rec.store, rec.members, tokens);
        let removed = Arc::new(tokio::sync::Notify::new());
        let transport = keel_server::rafthttp::Transport::new(keel_server::rafthttp::Setup {
            id: identity.member_id,
            cluster_id: identity.cluster_id,
            urls: split_urls(&cfg.initial_advertise_peer_urls),
            members: state.members.clone(),
            dialer: rec.dialer,
            rt: peer_rt.clone(),
            files: Arc::new(keel_api::snapshot_files::EtcdBackendFiles { store: state.store.clone(), cluster_id: identity.cluster_id }),
            snap_dir: PathBuf::from(cfg.snap_dir()),
            removed: removed.clone(),
        });
        let node_status = Arc::new(keel_raft::NodeStatus::default());
        let hub = watch::WatchHub::new(
            state.store.clone(),
            {
                let status = node_status.clone();
                Box::new(move || status.term())
            },
            identity.cluster_id,
            identity.member_id,
            cfg.max_request_bytes as usize,
        );
        let compaction = keel_server::apply::Compaction { batch: cfg.compaction_batch_limit(), sleep: cfg.compaction_sleep_interval() };
        let applier = Applier::new(
            &state,
            keel_server::apply::Setup {
                hub: hub.clone(),
                member_id: identity.member_id,
                db_path: rec.db_path,
                removed: removed.clone(),
                compaction,
                index_mode: index_mode(&cfg),
                leading: {
                    let status = node_status.clone();
                    Box::new(move || status.is_leader())
                },
                lease_extend: std::time::Duration::from_millis(cfg.election_timeout),
            },
        );
        let election_ticks = (cfg.election_timeout / cfg.heartbeat_interval).max(2) as usize;
        let node_cfg = NodeConfig {
            id: identity.member_id,
            tick: cfg.heartbeat(),
            election_ticks,
            snapshot_count: cfg.snapshot_count.max(1),
            catchup_entries: cfg.snapshot_catchup_entries(),
            apply_queue: keel_raft::apply::QUEUE,
            manual_ticks: false,
            log_memory_bytes: usize::try_from(cfg.raft_log_memory_bytes).unwrap_or(usize::MAX),
        };
        let (node, join) =
            keel_raft::node::start(node_cfg, rec.disk, applier, transport.clone(), node_status).map_err(anyhow::Error::msg)?;
        // The WAL's recovered entries were freed here, those beyond the raft log's budget.
        crate::memory::release_freed();
        transport.set_node(node.clone());
        transport.keep_connected();
        fast_forward_election(&peer_rt, transport.clone(), node.clone(), election_ticks, cfg.heartbeat());
        let (stopped_tx, stopped) = tokio::sync::oneshot::channel::<bool>();
        std::thread::spawn(move || {
            let ok = matches!(join.join(), Ok(Ok(())));
            if stopped_tx.send(ok).is_err() || !ok {
                std::process::exit(if ok { 0 } else { 1 });
            }
        });
        let server = Server::new(cfg.clone(), identity.member_id, identity.cluster_id, state, node.clone());
        let (ready, _) = tokio::sync::watch::channel(false);
        Ok(Member { cfg, peer_rt, server, node, transport, hub, removed, stopped, ready, initialized })
    }

    /// Serves the peer service on the peer runtime on the bound peer listeners; errors (a TLS
    /// URL without certificates) come back here.
    async fn serve_peers(&self, bound: Vec<(serve::ListenUrl, serve::Bound)>) -> Result<()> {
        let cfg = &self.cfg;
        let peer_tls = tls::peer_server(cfg)?;
        let raft = keel_server::rafthttp::Handler::new(
            &self.transport,
            Arc::new(forwarded::Leader(self.server.clone())),
            peer::snapshot_limit(cfg.quota_backend_bytes_reported()),
        );
        let peer_router = keel_api::peer_http::router(self.server.clone(), raft.clone()).fallback(keel_api::peer_http::not_found);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let endpoint = serve::Endpoint::Peer { check_san: !cfg.peer_skip_client_san_verification };
        let peer_limit = serve::ConnLimit::new(serve::MAX_PEER_CONNECTIONS);
        self.peer_rt.spawn(async move {
            let mut serving = Vec::new();
            for (lu, l) in bound {
                // Registered with the peer runtime, which serves it.
                let l = match l.listener() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e.context(format!("listen on {}", lu.url))));
                        return;
                    }
                };
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
                serving.push(tokio::spawn(serve::serve_peer(l, acceptor, peer_router.clone(), endpoint, peer_limit.clone(), raft.clone())));
            }
            let _ = bound_tx.send(Ok(()));
            for s in serving {
                let _ = s.await;
            }
        });
        bound_rx.await.map_err(|_| anyhow::anyhow!("the peer runtime stopped"))?
    }

    /// Serves the bound client listeners and binds and serves the metrics listeners. As etcd:
    /// the client ports are bound from the start but served only once this member is ready (its
    /// attributes published through raft, so every entry before them is applied). Serving
    /// earlier would show a restarted member's pre-replay state: a revision older than writes it
    /// had acknowledged.
    async fn serve_clients(
        &self,
        clients: Vec<(serve::ListenUrl, serve::Bound)>,
        client_http: Vec<(serve::ListenUrl, serve::Bound)>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let client_h2 = client_h2(cfg)?;
        let client_tls = tls::client_server(cfg)?;
        let limit = serve::ConnLimit::new(match cfg.max_client_connections {
            0 => serve::default_max_connections(),
            n => n,
        });
        tracing::info!(max_client_connections = limit.max(), "bounding client connections");
        // As etcd: with --listen-client-http-urls the HTTP services move there and the client
        // URLs serve gRPC only.
        let mut listeners: Vec<(serve::ListenUrl, serve::Listener, axum::Router)> = Vec::new();
        let router = self.client_router(true, client_http.is_empty());
        for (lu, l) in clients {
            listeners.push((lu, l.listener()?, router.clone()));
        }
        if !client_http.is_empty() {
            let router = self.client_router(false, true);
            for (lu, l) in client_http {
                listeners.push((lu, l.listener()?, router.clone()));
            }
        }
        for (lu, l, router) in listeners {
            let acceptor = match (lu.tls, &client_tls) {
                (true, Some(t)) => Some(t.clone()),
                (true, None) => {
                    bail!("TLS key/cert (--cert-file, --key-file) must be provided for client url {} with HTTPS scheme", lu.url)
                }
                (false, _) => None,
            };
            let mut ready = self.ready.subscribe();
            let limit = limit.clone();
            tokio::spawn(async move {
                if ready.wait_for(|r| *r).await.is_err() {
                    return;
                }
                tracing::info!(address = %lu.addr, tls = lu.tls, "serving client traffic on {}", lu.url);
                serve::serve(l, acceptor, lu.plain_too, router, client_h2, serve::Endpoint::Client, limit).await
            });
        }
        if let Some(urls) = cfg.listen_metrics_urls.as_deref().filter(|u| !u.is_empty()) {
            let mrouter = http::metrics_router(self.server.clone());
            for (lu, l) in serve::bind(&split_urls(urls)).await? {
                let acceptor = match (lu.tls, &client_tls) {
                    (true, Some(t)) => Some(t.clone()),
                    // etcd 3.6's words.
                    (true, None) => bail!("client TLS key/cert (--cert-file, --key-file) must be provided for metrics secure url"),
                    (false, _) => None,
                };
                tracing::info!(address = %lu.addr, "serving metrics on {}", lu.url);
                tokio::spawn(serve::serve(
                    l,
                    acceptor,
                    lu.plain_too,
                    mrouter.clone(),
                    serve::H2::DEFAULT,
                    serve::Endpoint::Metrics,
                    limit.clone(),
                ));
            }
        }
        Ok(())
    }

    /// Publishes the member, starts auto compaction and the lease duties, and waits for a stop
    /// signal or this member's removal; then stops raft (it hands leadership off and syncs the
    /// backend before it ends).
    pub async fn run(self) -> Result<()> {
        let auto_compaction =
            compactor::policy(&self.cfg.auto_compaction_mode, &self.cfg.auto_compaction_retention).map_err(anyhow::Error::msg)?;
        tokio::spawn(publish(self.server.clone(), self.ready));
        if self.cfg.bootstrap_defrag_threshold_megabytes > 0 {
            tokio::spawn(bootstrap_defrag(self.server.clone(), self.cfg.bootstrap_defrag_threshold_megabytes << 20));
        }
        tokio::spawn(compactor::run(self.server.clone(), auto_compaction));
        // Status' "in use" counts the backend's pages: a walk of the whole file, done once in
        // the background rather than at open (it would lengthen every restart).
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || {
            let (backend, data) = {
                let store = server.store();
                (store.backend(), store.data_size())
            };
            match backend.pages_in_use() {
                Ok(pages) => server.set_pages_in_use(pages, data),
                Err(e) => tracing::warn!(error = %e, "cannot count the backend's pages in use"),
            }
        });
        tokio::spawn(lease_duties::run(self.server.clone()));
        tokio::spawn(keel_server::cluster_version::run(self.server.clone(), self.transport.clone()));
        if !self.cfg.corrupt_check_time().is_zero() {
            tokio::spawn(keel_server::corruption::run_periodic(self.server.clone(), self.transport.clone(), self.cfg.corrupt_check_time()));
        }
        if self.cfg.compact_hash_check() {
            let every = self.cfg.compact_hash_check_time();
            tokio::spawn(keel_server::corruption::run_compact_hash(self.server.clone(), self.transport.clone(), every));
        }
        tokio::select! {
            _ = wait_for_shutdown() => tracing::info!("received a stop signal; stopping"),
            _ = self.removed.notified() => tracing::warn!("this member was removed from the cluster; stopping"),
        }
        self.node.stop();
        let limit = Duration::from_millis(self.cfg.election_timeout * 2) + Duration::from_secs(2);
        if tokio::time::timeout(limit, self.stopped).await.is_err() {
            tracing::warn!("raft node did not stop in time");
        }
        Ok(())
    }

    /// The client routes: the gRPC services (each behind etcd's `hasleader` gate), the plain HTTP
    /// endpoints and the `/v3` gateway (`grpc` and
    /// `http` pick which, for `--listen-client-http-urls`).
    fn client_router(&self, grpc_on: bool, http_on: bool) -> axum::Router {
        let cfg = &self.cfg;
        let (server, hub, transport) = (&self.server, &self.hub, &self.transport);
        let max_recv = cfg.max_request_bytes as usize + 512 * 1024;
        // etcd's `hasleader` metadata: such a request fails at once when there is no leader.
        let gate = {
            let server = server.clone();
            move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
                let wants = req.metadata().get("hasleader").map(|v| v.as_bytes() == b"true").unwrap_or(false);
                if wants && server.raft().leader() == 0 {
                    return Err(tonic::Status::unavailable("etcdserver: no leader"));
                }
                Ok(req)
            }
        };
        let kv = || api::kv::KvService { server: server.clone() };
        let lease = || api::lease::LeaseService { server: server.clone(), transport: transport.clone() };
        let cluster = || api::cluster::ClusterService { server: server.clone(), transport: transport.clone() };
        let maintenance = || api::maintenance::MaintenanceService { server: server.clone() };
        let concurrency = || api::concurrency::Concurrency { server: server.clone(), hub: hub.clone(), transport: transport.clone() };
        let auth = || api::auth::AuthService { server: server.clone() };
        use tonic::service::interceptor::InterceptedService as Gated;
        let grpc = tonic::service::Routes::new(Gated::new(
            KvServer::new(kv()).max_decoding_message_size(max_recv).max_encoding_message_size(usize::MAX),
            gate.clone(),
        ))
        .add_service(Gated::new(MaintenanceServer::new(maintenance()).max_decoding_message_size(max_recv), gate.clone()))
        .add_service(Gated::new(ClusterServer::new(cluster()).max_decoding_message_size(max_recv), gate.clone()))
        .add_service(Gated::new(LockServer::new(concurrency()), gate.clone()))
        .add_service(Gated::new(ElectionServer::new(concurrency()), gate.clone()))
        .add_service(Gated::new(
            WatchServer::new(api::watch::WatchService {
                server: server.clone(),
                hub: hub.clone(),
                next_stream: 0.into(),
                progress_interval: cfg.watch_progress_notify_interval(),
                max_watchers: cfg.max_watchers_per_stream.max(1),
            })
            .max_decoding_message_size(max_recv),
            gate.clone(),
        ))
        .add_service(Gated::new(AuthServer::new(auth()).max_decoding_message_size(max_recv), gate.clone()))
        .add_service(Gated::new(LeaseServer::new(lease()).max_decoding_message_size(max_recv), gate))
        // grpc.health.v1 (Check and Watch), as etcd registers it: the server as a whole ("")
        // serves as long as it runs.
        .add_service(tonic_health::server::health_reporter().1);
        let gw = Arc::new(gateway::Gateway {
            kv: kv(),
            lease: lease(),
            cluster: cluster(),
            maintenance: maintenance(),
            concurrency: concurrency(),
            auth: auth(),
            hub: hub.clone(),
            next_stream: 0.into(),
            streams: Arc::new(tokio::sync::Semaphore::new((cfg.max_concurrent_streams as usize).min(tokio::sync::Semaphore::MAX_PERMITS))),
        });
        let mut router = grpc
            .into_axum_router()
            .layer(axum::middleware::from_fn(errors::grpc_compat))
            .layer(axum::middleware::from_fn(grpc_metrics::grpc_layer));
        if go_http2_debug() {
            router = router.layer(axum::middleware::from_fn(log_authority));
        }
        let http = http::router(server.clone()).merge(gateway::router(gw, cfg.max_request_bytes as usize));
        match (grpc_on, http_on) {
            (true, true) => router.merge(http),
            (true, false) => router,
            _ => http,
        }
    }
}

/// The client listeners' HTTP/2 settings from the flags.
fn client_h2(cfg: &Config) -> Result<serve::H2> {
    let keepalive = |flag: &str, v: &str| config::parse_go_duration(v).ok_or_else(|| anyhow::anyhow!("invalid {flag} {v:?}"));
    let ka_interval = keepalive("--grpc-keepalive-interval", &cfg.grpc_keepalive_interval)?;
    let ka_timeout = keepalive("--grpc-keepalive-timeout", &cfg.grpc_keepalive_timeout)?;
    keepalive("--grpc-keepalive-min-time", &cfg.grpc_keepalive_min_time)?;
    Ok(serve::H2 {
        max_streams: cfg.max_concurrent_streams,
        keepalive: (!ka_interval.is_zero()).then_some((ka_interval, ka_timeout.max(Duration::from_secs(1)))),
    })
}

/// Opens (or creates) the WAL, snapshots and backend, and decides the member list: the
/// backend's record, else the snapshot's, else the bootstrap's.
async fn recover(cfg: &Config) -> Result<Recovered> {
    // Flags are checked before anything is created on disk.
    client_h2(cfg)?;
    compactor::policy(&cfg.auto_compaction_mode, &cfg.auto_compaction_retention).map_err(anyhow::Error::msg)?;
    let snap_dir = cfg.snap_dir();
    let wal_dir = cfg.wal_dir();
    let data_dir = cfg.data_dir();
    if keel_migrate::datadir::needs_conversion(Path::new(&data_dir)) {
        keel_migrate::datadir::convert(Path::new(&data_dir), Path::new(&wal_dir))
            .with_context(|| format!("cannot convert the etcd data dir {data_dir} (nothing was changed; etcd still starts on it)"))?;
    }
    // Durably: a member dir whose entry a power cut takes would start the member as new.
    keel_wal::create_dir_all_durable(Path::new(&snap_dir)).with_context(|| format!("create {snap_dir}"))?;

    let dialer = peer::Dialer::new(tls::peer_client(cfg)?, cfg.member_local_ip());
    let existed = Disk::exists(Path::new(&wal_dir));
    let mut initial_cluster = cfg.initial_cluster();
    if keel_server::discovery::wanted(cfg)? {
        if existed {
            tracing::warn!(wal_dir = %wal_dir, "discovery token is ignored since cluster already initialized; valid logs are found");
        } else {
            // Registered as this member's own `name=url,name=url`, as etcd does.
            let urls = keel_config::split_urls(&cfg.initial_advertise_peer_urls);
            let mine = urls.iter().map(|u| format!("{}={u}", cfg.name)).collect::<Vec<_>>().join(",");
            let id = keel_server::membership::member_id(&urls, &cfg.initial_cluster_token);
            let d = peer::Dialer::new(tls::discovery_client(cfg)?, None);
            initial_cluster = keel_server::discovery::join(cfg, &d, id, &mine).await.context("discovery failed")?;
            tracing::info!(initial_cluster = %initial_cluster, "initial cluster from the discovery service");
        }
    }
    let initial = Members::from_initial_cluster(&initial_cluster, &cfg.initial_cluster_token).map_err(anyhow::Error::msg)?;
    let boot = if existed {
        Bootstrap { identity: Identity { cluster_id: 0, member_id: 0, initial_voters: vec![] }, entries: vec![], members: initial.clone() }
    } else {
        bootstrap(cfg, &initial, &dialer).await?
    };

    let db_path = Path::new(&snap_dir).join("db");
    // The backend (its key index loaded) and the WAL (read whole) open side by side: neither
    // needs the other, and each is a good part of a restart.
    let (store, disk) = std::thread::scope(|s| {
        let wal = s.spawn(|| Disk::open(Path::new(&wal_dir), Path::new(&snap_dir), boot.identity.clone(), &boot.entries));
        let store = Store::open_with(&db_path, index_mode(cfg));
        (store, wal.join())
    });
    let mut store = store.context("open backend")?;
    let mut disk = disk.map_err(|_| anyhow::anyhow!("open WAL: the thread reading it panicked"))?.context("open WAL")?;
    if let Some(snap) = disk.snapshot.as_ref() {
        store = backend_for_snapshot(store, &db_path, Path::new(&snap_dir), snap.get_metadata().index, index_mode(cfg))?;
    }
    // As etcd: the flag acts on a restart only (a new member is a one-member cluster or joins).
    if cfg.force_new_cluster && existed {
        disk.force_new_cluster(store.consistent_index()).context("--force-new-cluster")?;
    }
    let identity = &disk.identity;
    let what = if existed { "restarting member" } else { "starting a new member" };
    tracing::info!(member_id = format!("{:x}", identity.member_id), cluster_id = format!("{:x}", identity.cluster_id), "{what}");

    let members = if let Some(b) = store.aux(AUX_MEMBERS) {
        Members::decode(b).map_err(anyhow::Error::msg)?
    } else if let Some(s) = disk.snapshot.as_ref().filter(|s| !s.get_data().is_empty()) {
        Members::from_snapshot_data(s.get_data(), identity.cluster_id).map_err(anyhow::Error::msg)?
    } else {
        store.set_aux(AUX_MEMBERS, boot.members.encode());
        store.commit().context("backend commit")?;
        boot.members.clone()
    };
    if members.cluster_id != identity.cluster_id {
        bail!("cluster ID mismatch: the backend belongs to cluster {:x}, the WAL to {:x}", members.cluster_id, identity.cluster_id);
    }
    // Opening the store built the key index through a buffer of rows about the index's own
    // size, freed on this thread (and the WAL's read buffer on its own): a member at 5 GB served
    // its first requests with 1.25 GB resident that settled at 600 MB seconds later, until this.
    crate::memory::release_freed();
    Ok(Recovered { disk, store, members, db_path, dialer })
}

/// The raft log starts after its newest snapshot, so the backend must hold at least that
/// snapshot's entries; an older one (a crash before a received backend was moved into place, or
/// a backend copied back by hand) would silently miss every entry up to the snapshot. As etcd:
/// the backend received with the snapshot (`<index>.snap.db`) takes its place, and without it
/// the member refuses to start.
/// Where the member's store keeps its key index (`--key-index-memory-bytes`).
fn index_mode(cfg: &Config) -> keel_mvcc::IndexMode {
    match cfg.key_index_memory_bytes {
        0 => keel_mvcc::IndexMode::Memory,
        n => keel_mvcc::IndexMode::Backend { budget: usize::try_from(n).unwrap_or(usize::MAX) },
    }
}

fn backend_for_snapshot(store: Store, db_path: &Path, snap_dir: &Path, index: u64, mode: keel_mvcc::IndexMode) -> Result<Store> {
    let have = store.consistent_index();
    if have >= index {
        return Ok(store);
    }
    let received = snap_dir.join(format!("{index:016x}.snap.db"));
    if !received.exists() {
        bail!(
            "failed to find database snapshot file (snap: snapshot file doesn't exist): the backend {} holds index {have}, older than the raft snapshot at index {index}, and {} is missing",
            db_path.display(),
            received.display()
        );
    }
    tracing::info!(snapshot_index = index, backend_index = have, file = %received.display(), "recovering the backend from the snapshot's database file");
    drop(store);
    let mut new = Store::open_with(&received, mode).context("open the snapshot's database file")?;
    if new.consistent_index() < index {
        bail!(
            "the snapshot's database file {} holds index {}, older than its snapshot at index {index}",
            received.display(),
            new.consistent_index()
        );
    }
    new.move_to(db_path).context("move the snapshot's database file into place")?;
    Ok(new)
}

/// Whether `GODEBUG` asks for Go's HTTP/2 debug log (`http2debug=2`), which operators and etcd's
/// tests use to see the `:authority` each request carries.
fn go_http2_debug() -> bool {
    std::env::var("GODEBUG").is_ok_and(|v| v.split(',').any(|kv| kv.trim() == "http2debug=2"))
}

/// Logs a request's authority as Go's HTTP/2 server does with `GODEBUG=http2debug=2`.
async fn log_authority(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    if let Some(a) = req.uri().authority() {
        eprintln!("http2: decoded hpack field header field \":authority\" = {:?}", a.as_str());
    }
    next.run(req).await
}

/// The member's state from its backend: leases, auth, alarms, the member list.
fn load_state(store: Store, members: Members, tokens: auth::Tokens) -> State {
    keel_metrics::METRICS.store_reads.with_label_values(&["getRecursive"]).inc();
    let mut lessor = lease::Lessor::default();
    keel_server::apply::load_leases(&store, &mut lessor);
    let auth = auth::AuthStore::load(&store);
    let alarms = alarm::Alarms::load(&store);
    // A compaction resumed at start publishes its revision when it finishes.
    let compacted = if store.compacting() { 0 } else { store.compacted_rev() };
    State {
        store: Arc::new(SharedStore::new(store)),
        members: Arc::new(RwLock::new(members)),
        lessor: Arc::new(parking_lot::Mutex::new(lessor)),
        auth: Arc::new(RwLock::new(auth)),
        tokens: Arc::new(tokens),
        alarms: Arc::new(RwLock::new(alarms)),
        waiters: Arc::new(Waiters::default()),
        hashes: Arc::default(),
        compacted: Arc::new(tokio::sync::watch::channel(compacted).0),
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
        let data = keel_server::rafthttp::client::fetch_members(dialer, &others).await?;
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
            members: Members { cluster_id: data.cluster_id, members: data.members, removed: data.removed },
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
    let entries = initial.members.iter().map(|m| (m.id, keel_server::membership::MemberJson::from(m).to_bytes())).collect();
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

/// Publishes this member's name and client URLs through raft (as etcd does), then announces that
/// the member serves.
/// etcd's `--bootstrap-defrag-threshold-megabytes`: at start, defragments the backend when at
/// least the threshold of it is free space.
async fn bootstrap_defrag(server: Arc<Server>, threshold: u64) {
    let (size, in_use) = {
        let store = server.store();
        (store.db_size(), store.db_size_in_use())
    };
    let free = size - in_use;
    if free < threshold {
        tracing::info!(
            current_db_size_bytes = size,
            current_db_size_in_use_bytes = in_use,
            bootstrap_defrag_threshold_bytes = threshold,
            "Skipping defragmentation"
        );
        return;
    }
    tracing::info!(current_db_size_bytes = size, free_bytes = free, "defragmenting at start");
    if let Err(e) = server.defragment().await {
        tracing::warn!(error = %e, "defragmentation at start failed");
    }
}

async fn publish(server: Arc<Server>, ready: tokio::sync::watch::Sender<bool>) {
    let attrs = MemberAttributes { name: server.cfg().name.clone(), client_urls: split_urls(&server.cfg().advertise_client_urls) };
    let publish = ClusterMemberAttrSetRequest { member_id: server.member_id(), member_attributes: Some(attrs.clone()) };
    loop {
        if server.raft().leader() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        match server.propose(Request::ClusterMemberAttrSet(publish.clone())).await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "failed to publish local member to cluster through raft; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    // A new cluster's leader sets the cluster version as soon as it leads (as etcd's does at its
    // first commit of the term): clients are served once it is applied here, so that what
    // depends on it (Downgrade, `/version`) answers as etcd's would; bounded, in case no
    // leader can decide one.
    for _ in 0..500 {
        if server.cluster_version().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tracing::info!(cluster_version = %config::ETCD_CLUSTER_VERSION.rsplit_once('.').map(|(mm, _)| mm).unwrap_or(config::ETCD_CLUSTER_VERSION), "enabled capabilities for version");
    tracing::info!(
        local_member_id = format!("{:x}", server.member_id()),
        name = %attrs.name,
        client_urls = ?attrs.client_urls,
        "published local member to cluster through raft"
    );
    let _ = ready.send(true);
    tracing::info!("ready to serve client requests");
}

/// etcd's fast-forward of the election clock at start: once a stream to another member is up
/// (waiting up to 5 s, etcd's connection read timeout), the clock is moved to two ticks short of
/// an election timeout, so that a cluster whose members all restarted elects within a few ticks
/// rather than a whole randomized timeout. Nothing happens once a leader is known (a member that
/// restarts into a live cluster hears its heartbeats first), nor in a cluster of one (it
/// campaigns at once).
fn fast_forward_election(
    rt: &tokio::runtime::Handle,
    transport: keel_server::rafthttp::Transport,
    node: keel_raft::NodeHandle,
    election_ticks: usize,
    tick: std::time::Duration,
) {
    let forward = election_ticks.saturating_sub(2);
    if forward == 0 {
        return;
    }
    rt.spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let active = transport.active_peers();
            if active > 0 {
                tracing::info!(
                    forward_ticks = forward,
                    forward_duration = ?tick * forward as u32,
                    election_ticks,
                    active_remote_members = active,
                    "initialized peer connections; fast-forwarding election ticks"
                );
                node.advance_ticks(forward);
                return;
            }
        }
    });
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

//! keel-bench: a load generator for the etcd v3 API, so the same runs measure Keel and etcd.
//!
//! Global flags pick endpoints, connections, clients, TLS and user; each subcommand is one
//! workload. Results: throughput and latency (HDR histogram) as text, or JSON with `--json`.
//! Talks gRPC only (keel-proto's clients); knows nothing of Keel's internals.

mod report;
mod workloads;

use anyhow::{bail, Context, Result};
use clap::Parser;
use keel_proto::etcdserverpb::auth_client::AuthClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{AuthenticateRequest, StatusRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Parser, Debug)]
#[command(name = "keel-bench", about = "Benchmarks an etcd v3 API server (Keel or etcd)")]
pub struct Cli {
    /// Comma-separated endpoints (host:port or URLs).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Total number of gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Total number of concurrent clients (tasks sharing the connections).
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Send every request to the leader.
    #[arg(long, global = true)]
    target_leader: bool,
    /// Send every request to one member that is not the leader.
    #[arg(long, global = true, conflicts_with = "target_leader")]
    target_follower: bool,
    /// user:password to authenticate with.
    #[arg(long, global = true)]
    user: Option<String>,
    /// TLS: CA bundle to verify the server.
    #[arg(long, global = true)]
    cacert: Option<String>,
    /// TLS: client certificate and key.
    #[arg(long, global = true)]
    cert: Option<String>,
    #[arg(long, global = true)]
    key: Option<String>,
    /// One JSON object on stdout instead of the text report.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: workloads::Cmd,
}

/// The connections and credentials every workload uses.
pub struct Ctx {
    pub chans: Vec<Channel>,
    pub token: Option<String>,
    pub clients: usize,
    pub json: bool,
}

impl Ctx {
    pub fn chan(&self, client: usize) -> Channel {
        self.chans[client % self.chans.len()].clone()
    }

    /// A request carrying the token, if any.
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            if let Ok(v) = t.parse() {
                r.metadata_mut().insert("token", v);
            }
        }
        r
    }
}

fn url(ep: &str, tls: bool) -> String {
    if ep.contains("://") {
        ep.to_string()
    } else if tls {
        format!("https://{ep}")
    } else {
        format!("http://{ep}")
    }
}

async fn endpoint(cli: &Cli, ep: &str) -> Result<Endpoint> {
    let tls = cli.cacert.is_some() || cli.cert.is_some();
    let mut e = Endpoint::from_shared(url(ep, tls))?.tcp_nodelay(true);
    if tls {
        let mut t = ClientTlsConfig::new();
        if let Some(ca) = &cli.cacert {
            t = t.ca_certificate(Certificate::from_pem(std::fs::read(ca).with_context(|| format!("read {ca}"))?));
        }
        if let (Some(c), Some(k)) = (&cli.cert, &cli.key) {
            t = t.identity(Identity::from_pem(std::fs::read(c)?, std::fs::read(k)?));
        }
        e = e.tls_config(t)?;
    }
    Ok(e)
}

async fn connect(cli: &Cli) -> Result<Ctx> {
    let eps: Vec<String> = cli.endpoints.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if eps.is_empty() {
        bail!("no endpoints");
    }
    let mut targets = eps.clone();
    if cli.target_leader || cli.target_follower {
        let mut chosen = None;
        for ep in &eps {
            let ch = endpoint(cli, ep).await?.connect().await.with_context(|| format!("connect {ep}"))?;
            let st = MaintenanceClient::new(ch).status(StatusRequest {}).await?.into_inner();
            let me = st.header.map(|h| h.member_id).unwrap_or(0);
            if st.leader != 0 && (st.leader == me) == cli.target_leader {
                chosen = Some(ep.clone());
                break;
            }
        }
        let what = if cli.target_leader { "the leader" } else { "a follower" };
        targets = vec![chosen.with_context(|| format!("no endpoint is {what}"))?];
    }
    let mut chans = Vec::new();
    for i in 0..cli.conns.max(1) {
        let ep = &targets[i % targets.len()];
        chans.push(endpoint(cli, ep).await?.connect().await.with_context(|| format!("connect {ep}"))?);
    }
    let token = match &cli.user {
        Some(u) => {
            let (name, password) = u.split_once(':').context("--user must be user:password")?;
            let r = AuthClient::new(chans[0].clone())
                .authenticate(AuthenticateRequest { name: name.into(), password: password.into() })
                .await
                .context("authenticate")?;
            Some(r.into_inner().token)
        }
        None => None,
    };
    Ok(Ctx { chans, token, clients: cli.clients.max(1), json: cli.json })
}

/// The load generator shares the machine with the server it measures: a leaner allocator leaves
/// more of the CPU to the server.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let ctx = connect(&cli).await?;
    let report = workloads::run(&ctx, &cli.cmd).await?;
    if ctx.json {
        println!("{}", report.json());
    } else {
        report.print();
    }
    if report.ops() == 0 && report.errors > 0 {
        bail!("every request failed: {}", report.first_error.unwrap_or_default());
    }
    Ok(())
}

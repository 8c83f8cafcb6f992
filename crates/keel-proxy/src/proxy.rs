//! `keel gateway start`: etcd's L4 gateway. Listens on `--listen-addr` and pipes each TCP
//! connection to one of `--endpoints` (round robin; an endpoint that refuses is skipped for
//! `--retry-delay`). Bytes pass through untouched, so gRPC, TLS and HTTP all work.
//!
//! Stands alone: shares nothing with the server.

use anyhow::{bail, Context, Result};
use clap::Parser;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(name = "keel gateway", args_override_self = true, about = "etcd's L4 gateway: forwards client connections to the members")]
struct Args {
    /// `start` (the only command).
    command: Vec<String>,
    /// Comma-separated member client endpoints (host:port or URLs).
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:23790")]
    listen_addr: String,
    /// How long an endpoint that failed is skipped (Go duration).
    #[arg(long, default_value = "1m")]
    retry_delay: String,
    /// Accepted for compatibility; DNS discovery is not supported.
    #[arg(long, default_value = "")]
    discovery_srv: String,
    #[arg(long, default_value = "")]
    trusted_ca_file: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    insecure_discovery: bool,
}

pub fn is_gateway(args: &[String]) -> bool {
    args.get(1).map(String::as_str) == Some("gateway")
}

pub fn main(args: Vec<String>) -> std::process::ExitCode {
    let a = match Args::try_parse_from(go_style_args(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    block_on("gateway stopped", run(a))
}

/// A subcommand's arguments as clap reads them: the subcommand's own word dropped, Go's
/// single-dash long flags (`-flag=value`) turned into `--flag=value`.
pub(crate) fn go_style_args(args: Vec<String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, a)| if a.starts_with('-') && !a.starts_with("--") && a.len() > 2 { format!("-{a}") } else { a })
        .collect()
}

/// Runs a standalone subcommand on its own runtime; an error is logged (as `what`) and
/// printed, and the process exits 1.
pub(crate) fn block_on(what: &str, f: impl std::future::Future<Output = Result<()>>) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(f) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{what}");
            eprintln!("Error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

struct Endpoints {
    addrs: Vec<String>,
    down_until: Mutex<Vec<Option<Instant>>>,
    next: AtomicUsize,
    retry: Duration,
}

impl Endpoints {
    /// Dials the next endpoint that is not resting, trying each once.
    async fn dial(&self) -> Option<(TcpStream, String)> {
        let n = self.addrs.len();
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            let resting = self.down_until.lock()[i].is_some_and(|t| t > Instant::now());
            if resting {
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&self.addrs[i])).await {
                Ok(Ok(s)) => return Some((s, self.addrs[i].clone())),
                _ => {
                    tracing::warn!(endpoint = %self.addrs[i], retry_delay = ?self.retry, "failed to connect to an endpoint; skipping it for a while");
                    self.down_until.lock()[i] = Some(Instant::now() + self.retry);
                }
            }
        }
        None
    }
}

async fn run(a: Args) -> Result<()> {
    if a.command.first().map(String::as_str) != Some("start") {
        bail!("usage: keel gateway start [--endpoints=...] [--listen-addr=...]");
    }
    if !a.discovery_srv.is_empty() {
        bail!("--discovery-srv is not supported by Keel's gateway; list the members with --endpoints");
    }
    let addrs: Vec<String> = a
        .endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| e.split_once("://").map(|(_, r)| r).unwrap_or(e).trim_end_matches('/').to_string())
        .collect();
    if addrs.is_empty() {
        bail!("no endpoints given");
    }
    let retry = keel_config::parse_go_duration(&a.retry_delay).context("--retry-delay")?;
    let eps = Arc::new(Endpoints { down_until: Mutex::new(vec![None; addrs.len()]), addrs, next: AtomicUsize::new(0), retry });
    let l = TcpListener::bind(&a.listen_addr).await.with_context(|| format!("listen on {}", a.listen_addr))?;
    tracing::info!(listen_addr = %a.listen_addr, endpoints = ?eps.addrs, "ready to proxy client requests");
    loop {
        let (mut client, peer) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let eps = eps.clone();
        tokio::spawn(async move {
            let Some((mut upstream, ep)) = eps.dial().await else {
                tracing::warn!(client = %peer, "no endpoint available; closing the client connection");
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(client = %peer, endpoint = %ep, error = %e, "proxied connection ended");
            }
        });
    }
}

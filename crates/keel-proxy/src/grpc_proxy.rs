//! `keel grpc-proxy start` (also `etcd grpc-proxy start`): etcd's gRPC proxy. Listens on
//! `--listen-addr` (h2c or TLS, as the flags say) and forwards every gRPC call, unary or
//! streaming, to one of the cluster's members as it came: the HTTP/2 request with its headers
//! (auth tokens too) and body stream, and the response with its trailers. A member that cannot be
//! reached is skipped for a second and the next one is used; with
//! `--endpoints-auto-sync-interval` the member list is read back from the cluster. HTTP:
//! `/health` (a read through the proxy's members) and `/proxy/health` (a read and a watch).
//! Unlike etcd's proxy it keeps no cache and does not coalesce watches.
//!
//! Stands alone: calls only the listener (`serve`), TLS and peer-dialing helpers and the
//! gateway's subcommand helpers (`proxy`), never the server.

use anyhow::{anyhow, bail, Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use keel_api::{serve, tls};
use keel_config::{parse_go_duration, Config};
use keel_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::{watch_request, MemberListRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use keel_server::peer;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tower::Service;

#[derive(Parser, Debug)]
#[command(name = "keel grpc-proxy", args_override_self = true, about = "etcd's gRPC proxy: forwards client calls to the members")]
struct Args {
    /// `start` (the only command).
    command: Vec<String>,
    /// Address to listen on for client calls.
    #[arg(long, default_value = "127.0.0.1:23790")]
    listen_addr: String,
    /// Comma-separated member client endpoints (host:port or URLs).
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// How often the member list is read back from the cluster (Go duration; 0: never).
    #[arg(long, default_value = "0s")]
    endpoints_auto_sync_interval: String,
    /// Address clients are told to use (accepted; Keel registers nothing).
    #[arg(long, default_value = "127.0.0.1:23790")]
    advertise_client_url: String,
    /// Client certificate for connecting to the members (its common name must be empty).
    #[arg(long, default_value = "")]
    cert: String,
    #[arg(long, default_value = "")]
    key: String,
    /// CA bundle the members' certificates are verified with.
    #[arg(long, default_value = "")]
    cacert: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    insecure_skip_tls_verify: bool,
    /// Serving certificate, key and client CA (then clients connect with TLS).
    #[arg(long, default_value = "")]
    cert_file: String,
    #[arg(long, default_value = "")]
    key_file: String,
    #[arg(long, default_value = "")]
    trusted_ca_file: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    auto_tls: bool,
    #[arg(long, default_value = "")]
    client_crl_file: String,
    #[arg(long, default_value = "")]
    listen_cipher_suites: String,
    #[arg(long, default_value = "TLS1.2")]
    tls_min_version: String,
    #[arg(long, default_value = "")]
    tls_max_version: String,
    /// Where `--auto-tls` keeps its certificate.
    #[arg(long, default_value = "default.proxy")]
    data_dir: String,
    /// etcd proxy flags for features Keel's proxy does not have; accepted and ignored.
    #[arg(long)]
    metrics_addr: Option<String>,
    #[arg(long)]
    namespace: Option<String>,
    #[arg(long)]
    resolver_prefix: Option<String>,
    #[arg(long)]
    resolver_ttl: Option<String>,
    #[arg(long)]
    max_send_bytes: Option<String>,
    #[arg(long)]
    max_recv_bytes: Option<String>,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    debug: Option<String>,
}

pub fn is_grpc_proxy(args: &[String]) -> bool {
    args.get(1).map(String::as_str) == Some("grpc-proxy")
}

pub fn main(args: Vec<String>) -> std::process::ExitCode {
    let a = match Args::try_parse_from(crate::proxy::go_style_args(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    crate::proxy::block_on("grpc-proxy failed", run(a))
}

/// The serving TLS, from the proxy's flags by way of the server's own TLS code.
fn serving_tls(a: &Args) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    let mut flags = vec!["keel".to_string(), "--data-dir".into(), a.data_dir.clone()];
    let mut add = |name: &str, v: &str| {
        if !v.is_empty() {
            flags.push(format!("--{name}={v}"));
        }
    };
    add("cert-file", &a.cert_file);
    add("key-file", &a.key_file);
    add("trusted-ca-file", &a.trusted_ca_file);
    add("client-crl-file", &a.client_crl_file);
    add("cipher-suites", &a.listen_cipher_suites);
    add("tls-min-version", &a.tls_min_version);
    add("tls-max-version", &a.tls_max_version);
    if a.auto_tls {
        flags.push("--auto-tls".into());
    }
    let cfg = Config::parse_from_args(flags).map_err(|e| anyhow!("{e}"))?;
    tls::client_server(&cfg)
}

/// The members, and a connection to each once made.
struct Upstream {
    dialer: peer::Dialer,
    /// Members' client URLs, in order.
    urls: Mutex<Vec<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Members that failed, skipped until the time given.
    down: Mutex<HashMap<String, Instant>>,
    next: std::sync::atomic::AtomicUsize,
}

/// How long a member that could not be reached is skipped.
const RETRY_DELAY: Duration = Duration::from_secs(1);

impl Upstream {
    /// A connection to a member that can be reached: members skipped lately come last.
    async fn channel(&self) -> Result<(String, Channel), tonic::Status> {
        let urls = self.urls.lock().clone();
        if urls.is_empty() {
            return Err(tonic::Status::unavailable("grpc-proxy: no endpoints"));
        }
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let mut order: Vec<String> = (0..urls.len()).map(|i| urls[(start + i) % urls.len()].clone()).collect();
        let down = self.down.lock().clone();
        order.sort_by_key(|u| down.get(u).is_some_and(|t| *t > now));
        let mut last = String::new();
        for url in order {
            if let Some(c) = self.channels.lock().get(&url).cloned() {
                return Ok((url, c));
            }
            match self.dialer.connect(&url).await {
                Ok(c) => {
                    self.channels.lock().insert(url.clone(), c.clone());
                    self.down.lock().remove(&url);
                    return Ok((url, c));
                }
                Err(e) => {
                    last = format!("{url}: {e}");
                    self.failed(&url);
                }
            }
        }
        Err(tonic::Status::unavailable(format!("grpc-proxy: no member can be reached ({last})")))
    }

    /// Forgets a member's connection and skips it for a while.
    fn failed(&self, url: &str) {
        self.channels.lock().remove(url);
        self.down.lock().insert(url.to_string(), Instant::now() + RETRY_DELAY);
    }

    fn set_urls(&self, urls: Vec<String>) {
        let mut cur = self.urls.lock();
        if *cur != urls {
            tracing::info!(endpoints = ?urls, "grpc-proxy: updated endpoints");
            self.channels.lock().retain(|u, _| urls.contains(u));
            *cur = urls;
        }
    }
}

/// A gRPC answer with no message: status in the headers (a trailers-only response).
fn grpc_error(s: tonic::Status) -> Response {
    let mut r = Response::new(Body::empty());
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", http::HeaderValue::from(s.code() as i32));
    if let Ok(v) = http::HeaderValue::from_str(&s.message().replace(['\r', '\n'], " ")) {
        h.insert("grpc-message", v);
    }
    r
}

/// Forwards one call to a member, streaming both ways.
async fn forward(State(up): State<Arc<Upstream>>, req: Request) -> Response {
    let (url, mut ch) = match up.channel().await {
        Ok(x) => x,
        Err(s) => return grpc_error(s),
    };
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let mut out = http::Request::new(tonic::body::Body::new(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = match http::Uri::builder().scheme("http").authority("member").path_and_query(path).build() {
        Ok(u) => u,
        Err(e) => return grpc_error(tonic::Status::internal(e.to_string())),
    };
    for (k, v) in parts.headers.iter() {
        if k != http::header::HOST && k != http::header::CONNECTION {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    if let Err(e) = std::future::poll_fn(|cx| ch.poll_ready(cx)).await {
        up.failed(&url);
        return grpc_error(tonic::Status::unavailable(format!("grpc-proxy: {url}: {e}")));
    }
    match ch.call(out).await {
        Ok(resp) => resp.map(Body::new),
        Err(e) => {
            up.failed(&url);
            grpc_error(tonic::Status::unavailable(format!("grpc-proxy: {url}: {e}")))
        }
    }
}

/// etcd's proxy health: a read through the members answers (permission denied counts as an
/// answer); for `/proxy/health` a watch must be created within 3 s too.
async fn health(up: &Upstream, watch: bool) -> (bool, String) {
    let (_, ch) = match up.channel().await {
        Ok(c) => c,
        Err(e) => return (false, format!("GET ERROR:{}", e.message())),
    };
    let mut kv = KvClient::new(ch.clone());
    let get = kv.range(RangeRequest { key: b"a".to_vec(), ..Default::default() });
    match tokio::time::timeout(Duration::from_secs(1), get).await {
        Ok(Ok(_)) => {}
        Ok(Err(s)) if s.code() == tonic::Code::PermissionDenied => {}
        Ok(Err(s)) => return (false, format!("GET ERROR:{}", s.message())),
        Err(_) => return (false, "GET ERROR:context deadline exceeded".into()),
    }
    if !watch {
        return (true, String::new());
    }
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest { key: b"a".to_vec(), ..Default::default() })),
    };
    let created = async {
        let mut s = WatchClient::new(ch).watch(tokio_stream::iter([create]).chain(tokio_stream::pending())).await?.into_inner();
        s.message().await
    };
    match tokio::time::timeout(Duration::from_secs(3), created).await {
        Ok(Ok(Some(_))) => (true, String::new()),
        _ => (false, "WATCH TIMEOUT".into()),
    }
}

fn health_response(ok: bool, reason: String) -> Response {
    let body = serde_json::json!({ "health": if ok { "true" } else { "false" }, "reason": reason }).to_string();
    let code = if ok { http::StatusCode::OK } else { http::StatusCode::SERVICE_UNAVAILABLE };
    (code, [(http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Reads the member list back every `every`: the client URLs of voting members become the
/// endpoints (as clientv3's auto sync does).
async fn auto_sync(up: Arc<Upstream>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok((url, ch)) = up.channel().await else { continue };
        let mut cluster = ClusterClient::new(ch);
        let list = tokio::time::timeout(every.max(Duration::from_secs(1)), cluster.member_list(MemberListRequest { linearizable: false }));
        match list.await {
            Ok(Ok(r)) => {
                let urls: Vec<String> = r
                    .into_inner()
                    .members
                    .into_iter()
                    .filter(|m| !m.name.is_empty() && !m.is_learner)
                    .flat_map(|m| m.client_ur_ls)
                    .collect();
                if !urls.is_empty() {
                    up.set_urls(urls);
                }
            }
            Ok(Err(_)) | Err(_) => up.failed(&url),
        }
    }
}

fn member_url(ep: &str, tls: bool) -> String {
    if ep.contains("://") {
        ep.to_string()
    } else {
        format!("{}://{ep}", if tls { "https" } else { "http" })
    }
}

async fn run(a: Args) -> Result<()> {
    if a.command.first().map(String::as_str) != Some("start") {
        bail!("usage: grpc-proxy start [flags]");
    }
    // As etcd: the proxy's client certificate must have an empty common name (a name would be
    // taken as the user of every call the proxy makes).
    if !a.cert.is_empty() {
        if let Some(cn) = tls::cert_common_name(&a.cert)? {
            bail!("cert has non empty Common Name ({cn}): {}", a.cert);
        }
    }
    let client_tls = !a.cert.is_empty() || !a.key.is_empty() || !a.cacert.is_empty() || a.insecure_skip_tls_verify;
    let dialer_tls = if client_tls { Some(tls::client_config(&a.cert, &a.key, &a.cacert, a.insecure_skip_tls_verify)?) } else { None };
    if a.insecure_skip_tls_verify {
        tracing::warn!("--insecure-skip-tls-verify was given, this grpc proxy process skips authentication of etcd server TLS certificates. This option should be enabled only for testing purposes.");
    }
    let urls: Vec<String> =
        a.endpoints.iter().flat_map(|e| e.split(',')).map(str::trim).filter(|e| !e.is_empty()).map(|e| member_url(e, client_tls)).collect();
    let up = Arc::new(Upstream {
        dialer: peer::Dialer::new(dialer_tls, None),
        urls: Mutex::new(urls),
        channels: Mutex::new(HashMap::new()),
        down: Mutex::new(HashMap::new()),
        next: Default::default(),
    });
    let sync = parse_go_duration(&a.endpoints_auto_sync_interval).ok_or_else(|| anyhow!("bad --endpoints-auto-sync-interval"))?;
    if !sync.is_zero() {
        tokio::spawn(auto_sync(up.clone(), sync));
    }
    let acceptor = serving_tls(&a)?;
    let h = up.clone();
    let hp = up.clone();
    let router = axum::Router::new()
        .route(
            "/health",
            get(move || async move {
                let (ok, reason) = health(&h, false).await;
                health_response(ok, reason)
            }),
        )
        .route(
            "/proxy/health",
            get(move || async move {
                let (ok, reason) = health(&hp, true).await;
                health_response(ok, reason)
            }),
        )
        .fallback(forward)
        .with_state(up);
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", a.listen_addr);
    let mut bound = serve::bind(std::slice::from_ref(&url)).await.with_context(|| format!("listen on {}", a.listen_addr))?;
    let (_, listener) = bound.pop().ok_or_else(|| anyhow!("no listener for {url}"))?;
    tracing::info!(address = %a.listen_addr, "listening for gRPC proxy client requests");
    tracing::info!(address = %a.listen_addr, "started gRPC proxy");
    let serving = serve::serve(
        listener,
        acceptor,
        false,
        router,
        serve::H2::DEFAULT,
        serve::Endpoint::Client,
        serve::ConnLimit::new(serve::default_max_connections()),
    );
    tokio::select! {
        _ = serving => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!(address = %a.listen_addr, "stop listening gRPC proxy client requests");
            Ok(())
        }
    }
}

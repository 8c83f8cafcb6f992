//! Listeners: one per URL of `--listen-client-urls` / `--listen-peer-urls`, TCP (http, https) or
//! unix sockets (unix, unixs). Each serves gRPC and HTTP on the same socket (HTTP/2 with prior
//! knowledge, HTTP/1.1, TLS with ALPN).

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;

/// Where a URL listens.
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A parsed listen URL.
pub struct ListenUrl {
    pub tls: bool,
    /// Plaintext too on the same address (an `http://` and an `https://` URL with one port, as
    /// etcd's connection multiplexer allows): each connection's first byte decides.
    pub plain_too: bool,
    pub addr: Addr,
    pub url: String,
}

pub fn parse_listen_url(u: &str) -> Result<ListenUrl> {
    // `unix:/path` (no authority, etcd 3.7's documented form) names the socket by its path, as
    // `unix:///path` does.
    let (scheme, rest) = match u.split_once("://") {
        Some(sr) => sr,
        None => u
            .split_once(':')
            .filter(|(s, r)| matches!(*s, "unix" | "unixs") && !r.is_empty())
            .ok_or_else(|| anyhow!("URL {u:?} has no scheme"))?,
    };
    let hostport = rest.trim_end_matches('/');
    let (tls, unix) = match scheme {
        "http" => (false, false),
        "https" => (true, false),
        "unix" => (false, true),
        "unixs" => (true, true),
        other => bail!("URL scheme must be http, https, unix, or unixs (got {other:?} in {u:?})"),
    };
    if unix {
        // As etcd: the host part names the socket file, relative to the working directory.
        return Ok(ListenUrl { tls, plain_too: false, addr: Addr::Unix(PathBuf::from(hostport)), url: u.to_string() });
    }
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| anyhow!("URL {u:?} has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" || host.is_empty() { "127.0.0.1" } else { host };
    let port: u16 = port.parse().with_context(|| format!("bad port in {u:?}"))?;
    let ip = host.parse().with_context(|| format!("listen URL {u:?} must name an IP address or localhost"))?;
    Ok(ListenUrl { tls, plain_too: false, addr: Addr::Tcp(SocketAddr::new(ip, port)), url: u.to_string() })
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A socket bound and listening, not yet tied to a runtime: bound at once (as etcd binds its
/// listeners before it reads its data dir), served later by the runtime that serves it.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Bound {
    /// The listener, registered with the runtime this is called on.
    pub fn listener(self) -> Result<Listener> {
        Ok(match self {
            Bound::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            Bound::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?)
            }
        })
    }
}

/// Connections the kernel holds for a listener before they are accepted (tokio's own default):
/// a client connecting during a long start waits there rather than being refused.
const BACKLOG: i32 = 1024;

fn bind_tcp(a: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(a), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&a.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Binds every URL now, outside any runtime; fails if any cannot be bound. An `http://` and an
/// `https://` URL on one TCP address share one listener that takes both.
pub fn bind_now(urls: &[String]) -> Result<Vec<(ListenUrl, Bound)>> {
    let mut out: Vec<(ListenUrl, Bound)> = Vec::new();
    for u in urls {
        let lu = parse_listen_url(u)?;
        if let Some((other, _)) = out.iter_mut().find(|(o, _)| matches!((&o.addr, &lu.addr), (Addr::Tcp(a), Addr::Tcp(b)) if a == b)) {
            if other.tls != lu.tls {
                other.plain_too = true;
                if lu.tls {
                    other.tls = true;
                    other.url = lu.url;
                }
                continue;
            }
        }
        let l = match &lu.addr {
            Addr::Tcp(a) => Bound::Tcp(bind_tcp(*a).with_context(|| format!("listen on {u}"))?),
            Addr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Bound::Unix(std::os::unix::net::UnixListener::bind(p).with_context(|| format!("listen on {u}"))?)
            }
        };
        out.push((lu, l));
    }
    Ok(out)
}

/// [`bind_now`], each listener registered with the current runtime.
pub async fn bind(urls: &[String]) -> Result<Vec<(ListenUrl, Listener)>> {
    bind_now(urls)?.into_iter().map(|(lu, b)| Ok((lu, b.listener()?))).collect()
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// HTTP/2 settings of a listener.
#[derive(Clone, Copy, Debug)]
pub struct H2 {
    pub max_streams: u32,
    /// Server pings every `interval` and drops the connection after `timeout` without answer.
    pub keepalive: Option<(std::time::Duration, std::time::Duration)>,
}

impl H2 {
    pub const DEFAULT: H2 = H2 { max_streams: u32::MAX, keepalive: None };
}

/// Which traffic a listener serves: how its connections are checked and named in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Client traffic (gRPC, the gateway, HTTP): HTTP/2 authorities are fixed (see
    /// [`crate::h2fix`]).
    Client,
    /// `--listen-metrics-urls`: metrics and health.
    Metrics,
    /// Peer traffic. With `check_san`, as etcd: a client certificate that names IP addresses or
    /// DNS names must name the address the connection comes from.
    Peer { check_san: bool },
}

impl Endpoint {
    fn rejected(self) -> &'static str {
        match self {
            Endpoint::Peer { .. } => "rejected connection on peer endpoint",
            _ => "rejected connection on client endpoint",
        }
    }
}

/// The most connections a group of listeners holds open at once: past it a new connection is
/// closed as soon as it is accepted (the client sees it reset and retries), so that a flood of
/// connections cannot take the file descriptors the WAL and the backend need, nor the memory
/// each connection's buffers cost. Cloning shares the count.
#[derive(Clone, Debug)]
pub struct ConnLimit {
    max: usize,
    places: std::sync::Arc<tokio::sync::Semaphore>,
    /// When a refusal was last logged (seconds since the epoch), so that a flood logs once a second.
    logged: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// One open connection counted by a [`ConnLimit`]; dropping it frees the place.
pub type ConnSlot = tokio::sync::OwnedSemaphorePermit;

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        let max = max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        ConnLimit { max, places: std::sync::Arc::new(tokio::sync::Semaphore::new(max)), logged: Default::default() }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn open(&self) -> usize {
        self.max - self.places.available_permits()
    }

    /// A place for one more connection, or None when `max` are open.
    pub fn try_take(&self) -> Option<ConnSlot> {
        self.places.clone().try_acquire_owned().ok()
    }

    /// Whether a refusal should be logged now (at most once a second).
    fn log_now(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.logged.swap(now, Ordering::AcqRel) != now
    }
}

/// The most connections the peer listeners hold open at once (a member's peers open a few each).
pub const MAX_PEER_CONNECTIONS: usize = 256;

/// The default bound of client connections: the open-file limit less what the member needs
/// for itself (WAL segments, snapshots, the backend: 256) and its peer listeners'
/// [`MAX_PEER_CONNECTIONS`]; at least 64.
pub fn default_max_connections() -> usize {
    const RESERVE: u64 = 256 + MAX_PEER_CONNECTIONS as u64;
    let (soft, _) = nofile_limit();
    soft.saturating_sub(RESERVE).clamp(64, usize::MAX as u64) as usize
}

/// The process's open-file limit (soft, hard).
fn nofile_limit() -> (u64, u64) {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return (1024, 1024);
    }
    (l.rlim_cur, l.rlim_max)
}

/// Raises the open-file soft limit to the hard limit, as Go's runtime does for etcd at start
/// (so that Keel and etcd get the same limit from the same shell).
pub fn raise_nofile_limit() {
    let (soft, hard) = nofile_limit();
    if soft >= hard {
        return;
    }
    let l = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        tracing::debug!(soft, hard, "could not raise the open-file limit");
    }
}

/// How long a TLS handshake may take (etcd's `tlsHandshakeTimeout`).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `router` on `listener` until the process ends.
pub async fn serve(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    plain_too: bool,
    router: axum::Router,
    h2: H2,
    endpoint: Endpoint,
    limit: ConnLimit,
) {
    accept_loop(listener, router, Settings { tls, plain_too, h2, endpoint, limit, streams: None }).await
}

/// Serves a peer listener: as [`serve`], and a connection over plain TCP whose first request
/// opens a raft stream from this member is kept for the raft thread to write
/// ([`keel_server::rafthttp::Handler::offer_stream`]).
pub async fn serve_peer(
    listener: Listener,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    endpoint: Endpoint,
    limit: ConnLimit,
    streams: keel_server::rafthttp::Handler,
) {
    let settings = Settings { tls, plain_too: false, h2: H2::DEFAULT, endpoint, limit, streams: Some(streams) };
    accept_loop(listener, router, settings).await
}

/// How a listener's connections are served.
struct Settings {
    tls: Option<TlsAcceptor>,
    plain_too: bool,
    h2: H2,
    endpoint: Endpoint,
    limit: ConnLimit,
    streams: Option<keel_server::rafthttp::Handler>,
}

async fn accept_loop(listener: Listener, router: axum::Router, settings: Settings) {
    let Settings { tls, plain_too, h2, endpoint, limit, streams } = settings;
    let fix_authority = endpoint == Endpoint::Client;
    loop {
        let accepted: std::io::Result<(Accepted, Option<SocketAddr>)> = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
                let _ = s.set_nodelay(true);
                (Accepted::Tcp(s), Some(a))
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| (Accepted::Other(Box::new(s)), None)),
        };
        let (sock, remote) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = limit.try_take() else {
            if limit.log_now() {
                let from = remote.map(|a| a.to_string()).unwrap_or_default();
                tracing::warn!(remote_addr = %from, open = limit.open(), max = limit.max(), "{}: too many open connections", endpoint.rejected());
            }
            drop(sock);
            continue;
        };
        let router = router.clone();
        let tls = tls.clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut sock: Box<dyn Io> = match sock {
                // A peer's raft stream over plain TCP is written by the raft thread itself.
                Accepted::Tcp(s) if tls.is_none() => match &streams {
                    Some(h) => match h.offer_stream(s).await {
                        Ok(()) => return,
                        Err((s, head)) => Box::new(Prefixed { head, inner: Box::new(s) }),
                    },
                    None => Box::new(s),
                },
                Accepted::Tcp(s) => Box::new(s),
                Accepted::Other(s) => s,
            };
            // A TLS connection starts with a handshake record (0x16); anything else is plaintext.
            let tls = match tls {
                Some(acc) if plain_too => {
                    let mut first = [0u8; 1];
                    let n = match tokio::time::timeout(std::time::Duration::from_secs(10), peek(&mut sock, &mut first)).await {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    if n == 1 && first[0] == 0x16 {
                        Some(acc)
                    } else {
                        None
                    }
                }
                other => other,
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(h2.max_streams);
            if let Some((interval, timeout)) = h2.keepalive {
                builder.http2().timer(hyper_util::rt::TokioTimer::new()).keep_alive_interval(interval).keep_alive_timeout(timeout);
            }
            let mut cn = None;
            let io: Box<dyn Io> = match tls {
                // As etcd: a handshake gets 10 s, so a client that stalls in it holds nothing.
                Some(acc) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(sock))
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timeout")))
                {
                    Ok(s) => {
                        let cert = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                        if let (Some(der), Endpoint::Peer { check_san: true }, Some(from)) = (&cert, endpoint, remote) {
                            if let Err(e) = check_san(der, from.ip()).await {
                                let (ips, dns) = san(der);
                                tracing::warn!(remote_addr = %from, ip_addresses = ?ips, dns_names = ?dns, error = %e, "{}", endpoint.rejected());
                                // Said to the peer, so that it knows it was refused (and sends
                                // over the stream this member opens to it) rather than cut off.
                                refuse(Box::new(s), format!("{}: {e}", keel_server::peer::PEER_CERT_REJECTED)).await;
                                return;
                            }
                        }
                        cn = cert.as_deref().and_then(common_name);
                        Box::new(s)
                    }
                    Err(e) => {
                        let from = remote.map(|a| a.to_string()).unwrap_or_default();
                        // As etcd: a client that hung up before finishing is not worth a warning.
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            tracing::debug!(remote_addr = %from, error = %e, "{}", endpoint.rejected());
                        } else {
                            tracing::warn!(remote_addr = %from, error = %e, "{}", endpoint.rejected());
                        }
                        return;
                    }
                },
                None => sock,
            };
            let io: Box<dyn Io> = if fix_authority { Box::new(crate::h2fix::FixAuthority::new(io)) } else { io };
            // The client certificate's common name goes with every request of the connection
            // (auth by certificate, `--client-cert-auth`).
            let svc =
                TowerToHyperService::new(tower::ServiceExt::map_request(router, move |mut r: http::Request<hyper::body::Incoming>| {
                    if let Some(cn) = &cn {
                        r.extensions_mut().insert(PeerCommonName(cn.clone()));
                    }
                    r
                }));
            let res = builder.serve_connection_with_upgrades(TokioIo::new(io), svc).await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// A connection just accepted.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Other(Box<dyn Io>),
}

/// The common name of a verified client certificate, put on each request of its connection.
#[derive(Clone, Debug)]
pub struct PeerCommonName(pub String);

/// Answers every request on `io` with PERMISSION_DENIED and `why`, for a few seconds at most.
async fn refuse(io: Box<dyn Io>, why: String) {
    let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
        let why = why.clone();
        async move {
            let mut resp = http::Response::new(axum::body::Body::empty());
            let h = resp.headers_mut();
            h.insert("content-type", http::HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", http::HeaderValue::from(tonic::Code::PermissionDenied as i32));
            if let Ok(v) = http::HeaderValue::from_str(&why) {
                h.insert("grpc-message", v);
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(io), svc);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
}

/// Reads the first byte without consuming it: the byte is put back in front of the stream.
async fn peek(sock: &mut Box<dyn Io>, buf: &mut [u8; 1]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let n = sock.read(buf).await?;
    let inner = std::mem::replace(sock, Box::new(tokio::io::duplex(1).0));
    *sock = Box::new(Prefixed { head: buf[..n].to_vec(), inner });
    Ok(n)
}

/// A stream that yields `head` before the rest of `inner`.
struct Prefixed {
    head: Vec<u8>,
    inner: Box<dyn Io>,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(out.remaining());
            out.put_slice(&self.head[..n]);
            self.head.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A certificate's subject alternative names: IP addresses and DNS names.
fn san(der: &[u8]) -> (Vec<std::net::IpAddr>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let mut ips = Vec::new();
    let mut dns = Vec::new();
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for n in &ext.value.general_names {
                match n {
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => ips.push(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                        16 => ips.push(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_canonical()),
                        _ => {}
                    },
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
    }
    (ips, dns)
}

/// etcd's check of a peer's client certificate against the address it connects from: a
/// certificate naming IP addresses must name that one, else one of its DNS names must resolve
/// to it; one naming neither passes. The errors are Go's words, as etcd logs them.
async fn check_san(der: &[u8], from: std::net::IpAddr) -> Result<(), String> {
    let from = from.to_canonical();
    let (ips, dns) = san(der);
    if ips.is_empty() && dns.is_empty() || ips.contains(&from) {
        return Ok(());
    }
    if dns.is_empty() {
        let valid = ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        return Err(format!("x509: certificate is valid for {valid}, not {from}"));
    }
    for name in dns.iter().filter(|d| !d.starts_with("*.")) {
        if let Ok(addrs) = tokio::net::lookup_host((name.as_str(), 0)).await {
            if addrs.map(|a| a.ip().to_canonical()).any(|ip| ip == from) {
                return Ok(());
            }
        }
    }
    let quoted = dns.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(" ");
    Err(format!("tls: \"{from}\" does not match any of DNSNames [{quoted}]"))
}

/// The subject common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls_as_etcd_takes_them() {
        let unix = |u: &str| match parse_listen_url(u).unwrap().addr {
            Addr::Unix(p) => p,
            Addr::Tcp(a) => panic!("{u}: tcp {a}"),
        };
        assert_eq!(unix("unix:///tmp/a.sock"), PathBuf::from("/tmp/a.sock"));
        assert_eq!(unix("unix:/tmp/a.sock"), PathBuf::from("/tmp/a.sock"), "etcd 3.7's unix:/path form");
        assert_eq!(unix("unix://rel.sock"), PathBuf::from("rel.sock"));
        assert!(parse_listen_url("unixs:/tmp/b.sock").unwrap().tls);
        assert!(parse_listen_url("127.0.0.1:2379").is_err());
        assert!(parse_listen_url("unix:").is_err());
        let t = parse_listen_url("http://localhost:2379").unwrap();
        assert!(matches!(t.addr, Addr::Tcp(a) if a.port() == 2379));
    }

    #[test]
    fn a_connection_limit_frees_a_place_when_a_slot_drops() {
        let l = ConnLimit::new(2);
        let (a, b) = (l.try_take(), l.try_take());
        assert!(a.is_some() && b.is_some());
        assert!(l.try_take().is_none(), "full at 2");
        assert_eq!(l.open(), 2);
        drop(a);
        assert_eq!(l.open(), 1);
        assert!(l.clone().try_take().is_some(), "clones share the count");
    }
}

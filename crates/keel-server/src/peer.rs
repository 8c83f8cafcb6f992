//! Connections to peers: [`Dialer`] dials a peer URL (TCP or a unix socket, TLS with the
//! peer or discovery certificate settings, from `--experimental-set-member-localaddr`) for the
//! peer protocol ([`crate::rafthttp`]), discovery and the gRPC proxy.
//!
//! Owns no state beyond the TLS settings; calls nothing in Keel.

use anyhow::{anyhow, Result};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// What a peer is told when its certificate does not name the address it connects from.
pub const PEER_CERT_REJECTED: &str = "peer certificate rejected";

/// How to dial peers: plain, or TLS with the peer certificate settings.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Source address for outgoing TCP connections (`--experimental-set-member-localaddr`).
    local_ip: Option<std::net::IpAddr>,
}

pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Dialer {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, local_ip: Option<std::net::IpAddr>) -> Dialer {
        Dialer { tls, local_ip }
    }

    /// A channel to `url` (http or https); connects lazily.
    pub fn channel(&self, url: &str) -> Result<Channel> {
        let (ep, connector) = self.endpoint(url)?;
        Ok(ep.connect_with_connector_lazy(connector))
    }

    /// A channel to `url`, connected now.
    pub async fn connect(&self, url: &str) -> Result<Channel> {
        let (ep, connector) = self.endpoint(url)?;
        Ok(ep.connect_with_connector(connector).await?)
    }

    /// Where `url` leads: the address (or socket path), the TLS server name, and the TLS
    /// settings when its scheme asks for TLS.
    fn target(&self, url: &str) -> Result<Target> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| anyhow!("bad peer URL {url:?}"))?;
        let hostport = rest.trim_end_matches('/').to_string();
        let (tls, unix) = match scheme {
            "https" | "unixs" => {
                (Some(self.tls.clone().ok_or_else(|| anyhow!("peer URL {url} needs peer TLS settings"))?), scheme == "unixs")
            }
            "http" | "unix" => (None, scheme == "unix"),
            other => return Err(anyhow!("unsupported peer URL scheme {other:?}")),
        };
        let host = if unix {
            "localhost".to_string()
        } else {
            hostport.rsplit_once(':').map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string()).unwrap_or_default()
        };
        Ok(Target { hostport, host, unix, tls })
    }

    #[allow(clippy::type_complexity)]
    fn endpoint(
        &self,
        url: &str,
    ) -> Result<(
        Endpoint,
        impl tower::Service<
                http::Uri,
                Response = hyper_util::rt::TokioIo<Box<dyn Io>>,
                Error = std::io::Error,
                Future = impl std::future::Future<Output = std::io::Result<hyper_util::rt::TokioIo<Box<dyn Io>>>> + Send,
            > + Clone
            + Send
            + 'static,
    )> {
        let Target { hostport, host, unix, tls } = self.target(url)?;
        // tonic needs an http URI; the connector below decides how to really connect.
        let ep = Endpoint::from_shared(if unix { "http://unix.sock".to_string() } else { format!("http://{hostport}") })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let local_ip = self.local_ip;
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let (hostport, host, tls) = (hostport.clone(), host.clone(), tls.clone());
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(dial(&hostport, &host, unix, tls, local_ip).await?)) }
        });
        Ok((ep, connector))
    }

    /// A connection to `url`'s host (TCP, or a unix socket; TLS for https and unixs), for etcd's
    /// HTTP/1.1 peer requests. Returns it with the `Host` header the request should carry.
    pub async fn connect_io(&self, url: &str) -> Result<(Box<dyn Io>, String)> {
        let Target { hostport, host, unix, tls } = self.target(url)?;
        let io = tokio::time::timeout(Duration::from_secs(1), dial(&hostport, &host, unix, tls, self.local_ip))
            .await
            .map_err(|_| anyhow!("{url}: dial timed out"))??;
        Ok((io, if unix { "localhost".to_string() } else { hostport }))
    }
}

impl Dialer {
    /// A plain TCP connection to `url`'s host when `url` is `http://` over TCP (None for TLS
    /// and unix sockets), with the `Host` header a request should carry.
    pub async fn connect_plain_tcp(&self, url: &str) -> Result<Option<(tokio::net::TcpStream, String)>> {
        let Target { hostport, unix, tls, .. } = self.target(url)?;
        if unix || tls.is_some() {
            return Ok(None);
        }
        let tcp = tokio::time::timeout(Duration::from_secs(1), dial_tcp(&hostport, self.local_ip))
            .await
            .map_err(|_| anyhow!("{url}: dial timed out"))??;
        Ok(Some((tcp, hostport)))
    }
}

/// A peer URL taken apart for dialing.
struct Target {
    hostport: String,
    host: String,
    unix: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Connects to `hostport` (a unix socket path when `unix`), from `local_ip` when given, and
/// runs the TLS handshake with `tls` naming `host`.
async fn dial(
    hostport: &str,
    host: &str,
    unix: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
    local_ip: Option<std::net::IpAddr>,
) -> std::io::Result<Box<dyn Io>> {
    let raw: Box<dyn Io> =
        if unix { Box::new(tokio::net::UnixStream::connect(hostport).await?) } else { Box::new(dial_tcp(hostport, local_ip).await?) };
    let Some(cfg) = tls else { return Ok(raw) };
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| std::io::Error::other(e.to_string()))?;
    match tokio_rustls::TlsConnector::from(cfg).connect(name, raw).await {
        Ok(s) => Ok(Box::new(s)),
        Err(e) => {
            let rejected = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map(|r| matches!(r, rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)))
                .unwrap_or(false);
            if rejected {
                // etcd's (Go's) wording, which operators grep for.
                return Err(std::io::Error::other("remote error: tls: bad certificate"));
            }
            Err(e)
        }
    }
}

/// A TCP connection to `hostport`, from `local_ip` when given, with Nagle off.
async fn dial_tcp(hostport: &str, local_ip: Option<std::net::IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = match local_ip {
        Some(ip) => {
            let addr = tokio::net::lookup_host(hostport)
                .await?
                .find(|a| a.is_ipv4() == ip.is_ipv4())
                .ok_or_else(|| std::io::Error::other(format!("cannot resolve {hostport}")))?;
            let sock = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            sock.bind(std::net::SocketAddr::new(ip, 0))?;
            sock.connect(addr).await?
        }
        None => tokio::net::TcpStream::connect(hostport).await?,
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The most bytes of backend a received snapshot may hold with backend quota `quota` (as
/// reported: 0 is already etcd's 2 GiB default): twice the quota, or no bound when the quota is
/// off (negative), since a leader without a quota can hold any amount.
pub fn snapshot_limit(quota: i64) -> Option<u64> {
    (quota > 0).then(|| (quota as u64).saturating_mul(2))
}

//! Client listeners: one per `--listen-client-urls` entry, http or https, each serving gRPC and
//! HTTP on the same port (HTTP/2 with prior knowledge, HTTP/1.1, TLS with ALPN).

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A parsed listen URL.
pub struct ListenUrl {
    pub tls: bool,
    pub addr: SocketAddr,
    pub url: String,
}

pub fn parse_listen_url(u: &str) -> Result<ListenUrl> {
    let (scheme, rest) = u.split_once("://").ok_or_else(|| anyhow!("URL {u:?} has no scheme"))?;
    let tls = match scheme {
        "http" => false,
        "https" => true,
        other => bail!("URL scheme must be http or https (got {other:?} in {u:?})"),
    };
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| anyhow!("URL {u:?} has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" || host.is_empty() { "127.0.0.1" } else { host };
    let port: u16 = port.parse().with_context(|| format!("bad port in {u:?}"))?;
    let ip = host.parse().with_context(|| format!("listen URL {u:?} must name an IP address or localhost"))?;
    Ok(ListenUrl { tls, addr: SocketAddr::new(ip, port), url: u.to_string() })
}

/// Binds every client URL; fails if any cannot be bound.
pub async fn bind(urls: &[String]) -> Result<Vec<(ListenUrl, TcpListener)>> {
    let mut out = Vec::new();
    for u in urls {
        let lu = parse_listen_url(u)?;
        let l = TcpListener::bind(lu.addr).await.with_context(|| format!("listen on {u}"))?;
        out.push((lu, l));
    }
    Ok(out)
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, router: axum::Router, max_streams: u32) {
    loop {
        let (sock, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = TowerToHyperService::new(router);
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http2().max_concurrent_streams(max_streams);
            let res = match tls {
                Some(acc) => match acc.accept(sock).await {
                    Ok(s) => builder.serve_connection_with_upgrades(TokioIo::new(s), svc).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => builder.serve_connection_with_upgrades(TokioIo::new(sock), svc).await,
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
}

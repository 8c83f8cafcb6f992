//! Client listeners: one per `--listen-client-urls` entry, http or https, each serving gRPC and
//! HTTP on the same port (HTTP/2 with prior knowledge, HTTP/1.1, TLS with ALPN).

use crate::config::Config;
use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A parsed listen URL.
pub struct ListenUrl {
    pub tls: bool,
    pub addr: SocketAddr,
    pub url: String,
}

pub fn parse_listen_url(u: &str) -> Result<ListenUrl> {
    let (scheme, rest) = u
        .split_once("://")
        .ok_or_else(|| anyhow!("URL {u:?} has no scheme"))?;
    let tls = match scheme {
        "http" => false,
        "https" => true,
        other => bail!("URL scheme must be http or https (got {other:?} in {u:?})"),
    };
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("URL {u:?} has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" || host.is_empty() {
        "127.0.0.1"
    } else {
        host
    };
    let port: u16 = port.parse().with_context(|| format!("bad port in {u:?}"))?;
    let ip = host
        .parse()
        .with_context(|| format!("listen URL {u:?} must name an IP address or localhost"))?;
    Ok(ListenUrl {
        tls,
        addr: SocketAddr::new(ip, port),
        url: u.to_string(),
    })
}

fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("read {path}"))?;
    if certs.is_empty() {
        bail!("no certificate in {path}");
    }
    Ok(certs)
}

fn load_key(path: &str) -> Result<PrivateKeyDer<'static>> {
    let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
        .with_context(|| format!("read {path}"))?
        .ok_or_else(|| anyhow!("no private key in {path}"))
}

/// Writes a self-signed certificate for `--auto-tls` into `dir` (kept across restarts).
fn auto_cert(dir: &Path) -> Result<(String, String)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .context("generate certificate")?;
        std::fs::write(&cert, ck.cert.pem()).context("write certificate")?;
        std::fs::write(&key, ck.key_pair.serialize_pem()).context("write key")?;
        tracing::info!(dir = %dir.display(), "generated a self-signed certificate for --auto-tls");
    }
    Ok((
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    ))
}

/// The TLS acceptor for client connections, from `--cert-file`/`--key-file` or `--auto-tls`.
pub fn client_tls(cfg: &Config) -> Result<Option<TlsAcceptor>> {
    let (cert, key) = match (&cfg.cert_file, &cfg.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ if cfg.auto_tls => auto_cert(&Path::new(&cfg.data_dir()).join("fixtures/client"))?,
        _ => return Ok(None),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    let builder = match (&cfg.trusted_ca_file, cfg.client_cert_auth) {
        (Some(ca), true) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).context("trusted CA")?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("client verifier")?;
            builder.with_client_cert_verifier(v)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut sc = builder
        .with_single_cert(load_certs(&cert)?, load_key(&key)?)
        .context("server certificate")?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(sc))))
}

/// Binds every client URL; fails if any cannot be bound.
pub async fn bind(urls: &[String]) -> Result<Vec<(ListenUrl, TcpListener)>> {
    let mut out = Vec::new();
    for u in urls {
        let lu = parse_listen_url(u)?;
        let l = TcpListener::bind(lu.addr)
            .await
            .with_context(|| format!("listen on {u}"))?;
        out.push((lu, l));
    }
    Ok(out)
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: axum::Router,
    max_streams: u32,
) {
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
                    Ok(s) => {
                        builder
                            .serve_connection_with_upgrades(TokioIo::new(s), svc)
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(sock), svc)
                        .await
                }
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        });
    }
}

//! TLS settings from etcd's flags (rustls, no OpenSSL): the client listeners' server config, the
//! peer listeners' server config, and the config members dial each other with. `--auto-tls` and
//! `--peer-auto-tls` generate self-signed certificates in the data dir, kept across restarts.

use anyhow::{anyhow, bail, Context, Result};
use keel_config::Config;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The crypto provider for `--cipher-suites`: TLS 1.2 suites limited to the list (Go names, as
/// etcd takes them; TLS 1.3 suites are not configurable, as in Go). Suites Go knows but rustls
/// deliberately lacks (CBC, 3DES, RC4) are left out with a warning.
fn provider_for(cfg: &Config) -> Result<Arc<rustls::crypto::CryptoProvider>> {
    let mut p = rustls::crypto::ring::default_provider();
    let Some(list) = cfg.cipher_suites.as_deref().filter(|l| !l.trim().is_empty()) else {
        return Ok(Arc::new(p));
    };
    let all = p.cipher_suites.clone();
    let mut chosen: Vec<rustls::SupportedCipherSuite> = all.iter().filter(|s| s.version() == &rustls::version::TLS13).copied().collect();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !name.starts_with("TLS_") {
            bail!("unexpected TLS cipher suite {name:?}");
        }
        let want = if name.ends_with("CHACHA20_POLY1305") { format!("{name}_SHA256") } else { name.to_string() };
        match all.iter().find(|s| format!("{:?}", s.suite()) == want) {
            Some(s) => {
                if !chosen.iter().any(|c| c.suite() == s.suite()) {
                    chosen.push(*s);
                }
            }
            None => tracing::warn!(cipher_suite = name, "TLS cipher suite not supported by Keel (rustls); left out"),
        }
    }
    p.cipher_suites = chosen;
    Ok(Arc::new(p))
}

/// `--tls-min-version` / `--tls-max-version`.
fn versions(cfg: &Config) -> Result<Vec<&'static rustls::SupportedProtocolVersion>> {
    let rank = |v: &str, default: u8| -> Result<u8> {
        match v {
            "" => Ok(default),
            "TLS1.2" => Ok(2),
            "TLS1.3" => Ok(3),
            "TLS1.0" | "TLS1.1" => bail!("TLS version {v} is not supported by Keel (TLS1.2 and TLS1.3 are)"),
            other => bail!("unexpected TLS version {other:?} (TLS1.2 or TLS1.3)"),
        }
    };
    let (lo, hi) = (rank(&cfg.tls_min_version, 2)?, rank(&cfg.tls_max_version, 3)?);
    if lo > hi {
        bail!("--tls-min-version is newer than --tls-max-version");
    }
    let mut out = Vec::new();
    if hi >= 3 {
        out.push(&rustls::version::TLS13);
    }
    if lo <= 2 {
        out.push(&rustls::version::TLS12);
    }
    Ok(out)
}

/// Certificate revocation lists from a PEM or DER file.
fn load_crls(path: &str) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {path}"))?;
    if bytes.starts_with(b"-----") {
        let crls = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("read {path}"))?;
        if crls.is_empty() {
            bail!("no CRL in {path}");
        }
        return Ok(crls);
    }
    Ok(vec![bytes.into()])
}

fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("open {path}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("read {path}"))?;
    if certs.is_empty() {
        bail!("no certificate in {path}");
    }
    Ok(certs)
}

fn load_key(path: &str) -> Result<PrivateKeyDer<'static>> {
    match PrivateKeyDer::from_pem_file(path) {
        Ok(k) => Ok(k),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(anyhow!("no private key in {path}")),
        Err(e) => Err(anyhow!("read {path}: {e}")),
    }
}

fn roots(ca: &str) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).context("trusted CA")?;
    }
    Ok(roots)
}

/// Writes a self-signed certificate into `dir` unless one is there already.
fn auto_cert(dir: &Path) -> Result<(String, String)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if !cert.exists() || !key.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let ck =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).context("generate certificate")?;
        std::fs::write(&cert, ck.cert.pem()).context("write certificate")?;
        std::fs::write(&key, ck.key_pair.serialize_pem()).context("write key")?;
        tracing::info!(dir = %dir.display(), "generated a self-signed certificate");
    }
    Ok((cert.to_string_lossy().into_owned(), key.to_string_lossy().into_owned()))
}

/// One side's TLS flags.
struct Side<'a> {
    cert: &'a Option<String>,
    key: &'a Option<String>,
    ca: &'a Option<String>,
    auto: bool,
    auto_dir: &'static str,
    allowed_cn: &'a Option<String>,
    allowed_hostname: &'a Option<String>,
    crl: &'a Option<String>,
}

fn cert_and_key(cfg: &Config, side: &Side) -> Result<Option<(String, String)>> {
    Ok(match (side.cert, side.key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        _ if side.auto => Some(auto_cert(&Path::new(&cfg.data_dir()).join(side.auto_dir))?),
        _ => None,
    })
}

fn server_config(cfg: &Config, side: &Side) -> Result<Option<TlsAcceptor>> {
    let Some((cert, key)) = cert_and_key(cfg, side)? else {
        return Ok(None);
    };
    let provider = provider_for(cfg)?;
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(&versions(cfg)?).context("TLS versions")?;
    // As etcd: a trusted CA file alone makes the listener require and verify client
    // certificates (`--client-cert-auth` decides whether their names are used for auth).
    let builder = match side.ca {
        Some(ca) => {
            let mut vb = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider);
            if let Some(crl) = side.crl {
                // As etcd: the client's own certificate is looked up in the list.
                vb = vb.with_crls(load_crls(crl)?).only_check_end_entity_revocation().allow_unknown_revocation_status();
            }
            let v = vb.build().context("client verifier")?;
            builder.with_client_cert_verifier(Arc::new(AllowedNames {
                inner: v,
                trusted: load_certs(ca)?,
                cn: side.allowed_cn.clone(),
                hostname: side.allowed_hostname.clone(),
            }))
        }
        _ => builder.with_no_client_auth(),
    };
    let mut sc = builder.with_single_cert(load_certs(&cert)?, load_key(&key)?).context("server certificate")?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(sc))))
}

/// TLS for client listeners (`--cert-file`/`--key-file`, or `--auto-tls`).
pub fn client_server(cfg: &Config) -> Result<Option<TlsAcceptor>> {
    server_config(
        cfg,
        &Side {
            cert: &cfg.cert_file,
            key: &cfg.key_file,
            ca: &cfg.trusted_ca_file,
            auto: cfg.auto_tls,
            auto_dir: "fixtures/client",
            allowed_cn: &None,
            allowed_hostname: &None,
            crl: &cfg.client_crl_file,
        },
    )
}

fn peer_side(cfg: &Config) -> Side<'_> {
    Side {
        cert: &cfg.peer_cert_file,
        key: &cfg.peer_key_file,
        ca: &cfg.peer_trusted_ca_file,
        auto: cfg.peer_auto_tls,
        auto_dir: "fixtures/peer",
        allowed_cn: &cfg.peer_cert_allowed_cn,
        allowed_hostname: &cfg.peer_cert_allowed_hostname,
        crl: &None,
    }
}

/// TLS for peer listeners (`--peer-cert-file`/`--peer-key-file`, or `--peer-auto-tls`).
pub fn peer_server(cfg: &Config) -> Result<Option<TlsAcceptor>> {
    server_config(cfg, &peer_side(cfg))
}

/// How this member dials its peers over https: verifies them with `--peer-trusted-ca-file`
/// (with `--peer-auto-tls` and no CA, like etcd, it does not verify), and presents its peer
/// certificate.
pub fn peer_client(cfg: &Config) -> Result<Option<Arc<rustls::ClientConfig>>> {
    let side = peer_side(cfg);
    let Some((cert, key)) = cert_and_key(cfg, &side)? else {
        return Ok(None);
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().context("TLS versions")?;
    let builder = match side.ca {
        Some(ca) => builder.with_root_certificates(roots(ca)?),
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServerCert(provider()))),
    };
    let mut cc = builder.with_client_auth_cert(load_certs(&cert)?, load_key(&key)?).context("peer client certificate")?;
    cc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(cc)))
}

/// How this member dials the v3 discovery cluster over https (`--discovery-cacert`, or no
/// verification with `--discovery-insecure-skip-tls-verify`; `--discovery-cert`/`--discovery-key`
/// as its client certificate). None when no discovery endpoint is https.
pub fn discovery_client(cfg: &Config) -> Result<Option<Arc<rustls::ClientConfig>>> {
    if !cfg.discovery_endpoints.split(',').any(|e| e.trim().starts_with("https://")) {
        return Ok(None);
    }
    if cfg.discovery_cacert.is_empty() && !cfg.discovery_insecure_skip_tls_verify {
        anyhow::bail!("discovery over https needs --discovery-cacert (or --discovery-insecure-skip-tls-verify)");
    }
    client_config(&cfg.discovery_cert, &cfg.discovery_key, &cfg.discovery_cacert, cfg.discovery_insecure_skip_tls_verify).map(Some)
}

/// A client's TLS for connecting to members (discovery, the gRPC proxy): servers verified
/// against `ca` (the system has none: without it, `insecure` must be set), and a client
/// certificate when `cert` and `key` are given.
pub fn client_config(cert: &str, key: &str, ca: &str, insecure: bool) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().context("TLS versions")?;
    let builder = if insecure {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServerCert(provider())))
    } else if !ca.is_empty() {
        builder.with_root_certificates(roots(ca)?)
    } else {
        anyhow::bail!("TLS to the members needs a CA bundle (or skipping verification)");
    };
    let mut cc = if !cert.is_empty() && !key.is_empty() {
        builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?).context("client certificate")?
    } else {
        builder.with_no_client_auth()
    };
    cc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cc))
}

/// The subject common name of the first certificate in a PEM file, if it has one.
pub fn cert_common_name(path: &str) -> Result<Option<String>> {
    Ok(load_certs(path)?.first().and_then(|c| crate::serve::common_name(c)).filter(|cn| !cn.is_empty()))
}

/// Accepts any server certificate (still checking the handshake signature): `--peer-auto-tls`
/// peers have self-signed certificates nobody can verify.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Client certificate check: the chain must verify (as Go does, a certificate that is itself one
/// of the trusted CA certificates is accepted as is, while valid), and for
/// `--peer-cert-allowed-cn` / `--peer-cert-allowed-hostname` carry the allowed CommonName or name.
#[derive(Debug)]
struct AllowedNames {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    trusted: Vec<CertificateDer<'static>>,
    cn: Option<String>,
    hostname: Option<String>,
}

fn cert_names(cert: &CertificateDer<'_>) -> (Vec<String>, Vec<String>) {
    use x509_parser::prelude::*;
    let Ok((_, x)) = X509Certificate::from_der(cert.as_ref()) else { return (vec![], vec![]) };
    let cns = x.subject().iter_common_name().filter_map(|a| a.as_str().ok().map(str::to_string)).collect();
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(ip);
                        names.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    (cns, names)
}

impl rustls::server::danger::ClientCertVerifier for AllowedNames {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(ok) => ok,
            Err(e) => {
                let in_date = || {
                    x509_parser::parse_x509_certificate(end_entity.as_ref()).is_ok_and(|(_, x)| {
                        let t = now.as_secs() as i64;
                        x.validity().not_before.timestamp() <= t && t <= x.validity().not_after.timestamp()
                    })
                };
                if self.trusted.iter().any(|c| c.as_ref() == end_entity.as_ref()) && in_date() {
                    rustls::server::danger::ClientCertVerified::assertion()
                } else {
                    return Err(e);
                }
            }
        };
        let (cns, names) = cert_names(end_entity);
        // etcd 3.6 takes a comma-separated list of allowed CommonNames.
        if let Some(cn) = &self.cn {
            if !cns.iter().any(|c| cn.split(',').any(|allowed| allowed.trim() == c)) {
                tracing::warn!(allowed_cn = %cn, got = ?cns, "rejected peer connection: client certificate authentication failed (CommonName not allowed)");
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
            }
        }
        if let Some(h) = &self.hostname {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(h)) {
                tracing::warn!(allowed_hostname = %h, got = ?names, "rejected peer connection: client certificate authentication failed (hostname not allowed)");
                return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

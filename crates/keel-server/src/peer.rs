//! Peer traffic between members on the peer URLs: raft messages on one long-lived stream per
//! peer, snapshots (raft message + the leader's backend) on a separate stream, and the member list
//! for members joining an existing cluster.
//!
//! Sending side ([`PeerTransport`]): never blocks the raft thread. Each peer has a bounded queue
//! drained by its own task; a full queue or a broken stream drops messages and reports the peer
//! unreachable to raft, which retries. Receiving side ([`PeerService`]): checks the sender's
//! cluster ID and hands messages to the node.
//!
//! Reverse path: every member also keeps a `RaftPull` stream open to each peer, on which that
//! peer sends this member's messages when its own stream to this member cannot be opened (this
//! member rejects its connections, e.g. its certificate does not name the address it dials
//! from): as in etcd, where the receiver opens the streams, such a peer still takes part.

use crate::membership::Members;
use anyhow::{anyhow, Context, Result};
use keel_mvcc::backend::{Backend, Meta};
use keel_mvcc::SharedStore;
use keel_proto::keelpb::peer_client::PeerClient;
use keel_proto::keelpb::peer_server::Peer;
use keel_proto::keelpb::{BackendRecord, MembersRequest, PeerAck, RaftBatch, RaftPullRequest, SnapshotChunk, SnapshotData};
use keel_raft::eraftpb::{Message, MessageType};
use keel_raft::{NodeHandle, ProtoMessage, Transport};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

/// gRPC metadata carrying the sender's cluster ID (hex), checked by the receiver.
const CLUSTER_ID_HEADER: &str = "x-etcd-cluster-id";
/// The start of the gRPC message a peer gets when its certificate does not name the address it
/// connects from (read back here to tell a refusal from a network failure).
pub const PEER_CERT_REJECTED: &str = "peer certificate rejected";
/// Largest message on the peer streams.
pub const MAX_PEER_MESSAGE: usize = 64 * 1024 * 1024;
/// Raft messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Bytes of raft messages sent in one batch.
const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches queued on a reverse stream.
const PULL_QUEUE: usize = 64;
/// How long messages go over a reverse stream before opening a stream of its own is tried again.
const PULL_TURN: Duration = Duration::from_secs(5);
/// Bytes of backend records in one snapshot chunk.
const CHUNK_BYTES: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Connections

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
    let raw: Box<dyn Io> = if unix {
        Box::new(tokio::net::UnixStream::connect(hostport).await?)
    } else {
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
        Box::new(tcp)
    };
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

fn client(ch: Channel) -> PeerClient<Channel> {
    PeerClient::new(ch).max_decoding_message_size(MAX_PEER_MESSAGE).max_encoding_message_size(MAX_PEER_MESSAGE)
}

fn with_cluster<T>(msg: T, cluster_id: u64) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = format!("{cluster_id:x}").parse() {
        r.metadata_mut().insert(CLUSTER_ID_HEADER, v);
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Sending

struct Inner {
    self_id: u64,
    cluster_id: u64,
    members: Arc<RwLock<Members>>,
    store: Arc<SharedStore>,
    node: OnceLock<NodeHandle>,
    dialer: Dialer,
    rt: tokio::runtime::Handle,
    queues: Mutex<HashMap<u64, mpsc::Sender<Vec<u8>>>>,
    /// When each peer's stream last became active (None: not connected).
    active_since: Mutex<HashMap<u64, Instant>>,
    /// Channels for requests to the leader (forwarded keep-alives, TTL queries, promotions),
    /// by peer URL: one kept connection each, not one per request.
    request_channels: Mutex<HashMap<String, Channel>>,
    /// Reverse streams peers opened to this member, by peer: where that peer's messages go when
    /// no stream to it can be opened.
    pulls: Mutex<HashMap<u64, mpsc::Sender<RaftBatch>>>,
    /// Peers this member keeps a reverse stream open to.
    pulling: Mutex<std::collections::HashSet<u64>>,
    /// Peers with a prober ([`probe_loop`]).
    probing: Mutex<std::collections::HashSet<u64>>,
}

/// The raft transport over the peer URLs. Clone it freely; all clones share the connections.
#[derive(Clone)]
pub struct PeerTransport {
    inner: Arc<Inner>,
}

impl PeerTransport {
    /// A transport whose connections and streams run on `rt` (the peer runtime: client load on
    /// the main runtime cannot hold raft messages back).
    pub fn new(
        self_id: u64,
        cluster_id: u64,
        members: Arc<RwLock<Members>>,
        store: Arc<SharedStore>,
        dialer: Dialer,
        rt: tokio::runtime::Handle,
    ) -> PeerTransport {
        PeerTransport {
            inner: Arc::new(Inner {
                self_id,
                cluster_id,
                members,
                store,
                node: OnceLock::new(),
                dialer,
                rt,
                queues: Mutex::new(HashMap::new()),
                active_since: Mutex::new(HashMap::new()),
                request_channels: Mutex::new(HashMap::new()),
                pulls: Mutex::new(HashMap::new()),
                pulling: Mutex::new(Default::default()),
                probing: Mutex::new(Default::default()),
            }),
        }
    }

    /// Connects the transport to the node it reports to.
    pub fn set_node(&self, node: NodeHandle) {
        let _ = self.inner.node.set(node);
    }

    /// Since when the stream to `id` has been up, if it is.
    pub fn active_since(&self, id: u64) -> Option<Instant> {
        self.inner.active_since.lock().get(&id).copied()
    }

    /// A peer client for member `id` on a cached channel: the leader, for requests only it can
    /// answer, or any peer for a probe.
    fn member_client(&self, id: u64) -> Result<PeerClient<Channel>, Status> {
        let url = self.inner.peer_url(id).ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let mut chans = self.inner.request_channels.lock();
        if let Some(ch) = chans.get(&url) {
            return Ok(client(ch.clone()));
        }
        let ch = self.inner.dialer.channel(&url).map_err(|e| Status::unavailable(e.to_string()))?;
        // A lazily connected channel reconnects by itself; members change rarely.
        if chans.len() > 64 {
            chans.clear();
        }
        chans.insert(url, ch.clone());
        Ok(client(ch))
    }

    /// Asks the leader to promote learner `id` (only the leader knows its progress).
    pub async fn forward_promote(&self, leader: u64, id: u64) -> Result<Vec<keel_proto::etcdserverpb::Member>, Status> {
        let r = self
            .member_client(leader)?
            .promote(with_cluster(keel_proto::etcdserverpb::MemberPromoteRequest { id }, self.inner.cluster_id))
            .await?;
        Ok(r.into_inner().members)
    }

    /// Keeps a connection to every other member, whether or not raft has something to send, so
    /// that connectivity is known (etcd's strict reconfiguration checks rely on it).
    pub fn keep_connected(&self) {
        let t = self.clone();
        self.inner.rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let ids: Vec<u64> = t.inner.members.read().members.iter().map(|m| m.id).collect();
                for id in ids {
                    if id != t.inner.self_id {
                        t.queue(id);
                        if t.inner.pulling.lock().insert(id) {
                            t.inner.rt.spawn(pull_loop(t.inner.clone(), id));
                        }
                        if t.inner.probing.lock().insert(id) {
                            t.inner.rt.spawn(probe_loop(t.clone(), id));
                        }
                    }
                }
            }
        });
    }

    /// Renews a lease on the leader; returns its TTL (0: no such lease).
    pub async fn forward_lease_renew(&self, leader: u64, id: i64) -> Result<i64, Status> {
        let r = self
            .member_client(leader)?
            .lease_renew(with_cluster(keel_proto::etcdserverpb::LeaseKeepAliveRequest { id }, self.inner.cluster_id))
            .await?;
        Ok(r.into_inner().ttl)
    }

    /// Asks the leader for a lease's remaining TTL.
    pub async fn forward_lease_ttl(
        &self,
        leader: u64,
        req: keel_proto::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<keel_proto::etcdserverpb::LeaseTimeToLiveResponse, Status> {
        Ok(self.member_client(leader)?.lease_time_to_live(with_cluster(req, self.inner.cluster_id)).await?.into_inner())
    }

    /// A peer opened a reverse stream: what this member sends on it, when it must.
    pub fn register_pull(&self, from: u64) -> mpsc::Receiver<RaftBatch> {
        let (tx, rx) = mpsc::channel(PULL_QUEUE);
        self.inner.pulls.lock().insert(from, tx);
        rx
    }

    fn queue(&self, to: u64) -> mpsc::Sender<Vec<u8>> {
        let mut q = self.inner.queues.lock();
        if let Some(tx) = q.get(&to) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        q.insert(to, tx.clone());
        let inner = self.inner.clone();
        self.inner.rt.spawn(peer_loop(inner, to, rx));
        tx
    }
}

impl Inner {
    fn unreachable(&self, to: u64) {
        self.active_since.lock().remove(&to);
        if let Some(n) = self.node.get() {
            n.report_unreachable(to);
        }
    }

    fn peer_url(&self, to: u64) -> Option<String> {
        self.members.read().get(to).and_then(|m| m.peer_urls.first().cloned())
    }

    fn is_member(&self, to: u64) -> bool {
        self.members.read().get(to).is_some()
    }
}

impl Transport for PeerTransport {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if to == self.inner.self_id || to == 0 {
                continue;
            }
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let inner = self.inner.clone();
                self.inner.rt.spawn(send_snapshot(inner, m));
                continue;
            }
            let bytes = match m.write_to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "peer: cannot encode a raft message");
                    continue;
                }
            };
            let metrics = &keel_metrics::METRICS;
            let to_label = format!("{to:x}");
            let n = bytes.len() as u64;
            if self.queue(to).try_send(bytes).is_err() {
                metrics.peer_sent_failures.with_label_values(&[&to_label]).inc();
                if m.get_msg_type() == MessageType::MsgHeartbeat {
                    metrics.heartbeat_failures.inc();
                }
                self.inner.unreachable(to);
            } else {
                metrics.peer_sent_bytes.with_label_values(&[&to_label]).inc_by(n);
            }
        }
    }
}

/// Keeps one stream open to `to` and feeds it from the queue, reconnecting with backoff.
async fn peer_loop(inner: Arc<Inner>, to: u64, rx: mpsc::Receiver<Vec<u8>>) {
    let rx = Arc::new(Mutex::new(rx));
    let drain = || {
        let mut q = rx.lock();
        while q.try_recv().is_ok() {}
    };
    let active = keel_metrics::METRICS.active_peers.with_label_values(&[&format!("{:x}", inner.self_id), &format!("{to:x}")]);
    let mut backoff = Duration::from_millis(50);
    // Whether the last attempt failed (failures are logged once per outage).
    let mut down = false;
    let report = |down: &mut bool, what: &str, why: String, url: &str| {
        // A rejected certificate is worth saying even in an outage that began otherwise (the
        // peer was not listening yet): it will not heal by itself.
        let bad_cert = why.contains("BadCertificate") || why.contains("bad certificate");
        if *down && !bad_cert {
            tracing::debug!(peer = format!("{to:x}"), url, error = %why, "peer: {what}");
            return;
        }
        *down = true;
        if why.contains("cluster ID mismatch") {
            tracing::error!(
                peer = format!("{to:x}"),
                url,
                local_cluster_id = format!("{:x}", inner.cluster_id),
                "peer: rejected by a member of another cluster: cluster ID mismatch (check --initial-cluster-token and --initial-cluster)"
            );
        } else if bad_cert {
            // etcd's (Go's) wording, which operators grep for.
            tracing::warn!(peer = format!("{to:x}"), url, "peer: {what}: remote error: tls: bad certificate");
        } else {
            tracing::warn!(peer = format!("{to:x}"), url, error = %why, "peer: {what}; retrying");
        }
    };
    loop {
        if !inner.is_member(to) {
            tracing::info!(peer = format!("{to:x}"), "peer: stopped sending to a removed member");
            inner.queues.lock().remove(&to);
            return;
        }
        let Some(url) = inner.peer_url(to) else {
            return;
        };
        let ch = match tokio::time::timeout(Duration::from_secs(2), inner.dialer.connect(&url)).await {
            Ok(Ok(c)) => c,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "timed out".to_string(),
                };
                // The peer refused this member's certificate (not a network failure, nor a peer
                // not listening yet): its reverse stream, if it holds one, carries the messages.
                let refused = refused_by_peer(&why);
                report(&mut down, "cannot connect", why, &url);
                if refused && relay_over_pull(&inner, to, &rx).await {
                    continue;
                }
                inner.unreachable(to);
                drain();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let mut c = client(ch);
        // The gRPC body pulls batches straight from the queue: no task in between.
        let req = with_cluster(QueueStream { rx: rx.clone() }, inner.cluster_id);
        let opened = Instant::now();
        let mut call = tokio::spawn(async move { c.raft(req).await });
        // A stream that stays up for a while is healthy: only then does the peer count as
        // connected (a TLS 1.3 server rejects a client certificate after the handshake).
        let broken = tokio::select! {
            r = &mut call => Some(r),
            _ = tokio::time::sleep(Duration::from_millis(500)) => None,
        };
        // A stream the peer ends at once may have been refused (a certificate it does not
        // accept); one that ran and then died is a network or peer failure, only dialed again.
        let quick = broken.is_some();
        let broken = match broken {
            Some(r) => r,
            None => {
                // Active since the stream opened (as etcd counts it), now that it proved stable.
                inner.active_since.lock().entry(to).or_insert(opened);
                active.set(1);
                if down {
                    tracing::info!(peer = format!("{to:x}"), "peer: connected");
                    down = false;
                }
                backoff = Duration::from_millis(50);
                (&mut call).await
            }
        };
        if rx.lock().is_closed() {
            // The queue was dropped: the member was removed.
            return;
        }
        let broken = match broken {
            Ok(Ok(_)) => "stream closed".to_string(),
            r => format!("{:?}", r.map(|r| r.map(|_| ()))),
        };
        active.set(0);
        let refused = quick && refused_by_peer(&broken);
        report(&mut down, "lost connection", broken, &url);
        if refused && relay_over_pull(&inner, to, &rx).await {
            continue;
        }
        inner.unreachable(to);
        // Drop what queued up meanwhile: raft resends what matters.
        drain();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Whether a failed connection or stream was the peer refusing this member's certificate: a TLS
/// alert in the handshake, or the peer's answer after it (see [`keel_api::serve`]). A closed or reset
/// connection is not: a proxy in front of a peer that is not up yet closes connections too, and a
/// blackholed member must stay cut off (etcd's TestHTTPHealthHandler), not be reached over the
/// reverse stream.
fn refused_by_peer(why: &str) -> bool {
    const SIGNS: [&str; 7] =
        [PEER_CERT_REJECTED, "BadCertificate", "bad certificate", "UnknownCA", "unknown ca", "CertificateRequired", "certificate required"];
    SIGNS.iter().any(|s| why.contains(s))
}

/// The body of a raft stream: each item is every message queued at that moment, up to
/// [`BATCH_BYTES`]. Only one stream to a peer exists at a time; the queue outlives it.
/// Sends `to`'s queued messages on the reverse stream `to` opened, if there is one, for
/// [`PULL_TURN`] or until that stream ends; false when there is none.
async fn relay_over_pull(inner: &Inner, to: u64, rx: &Arc<Mutex<mpsc::Receiver<Vec<u8>>>>) -> bool {
    use futures::StreamExt;
    let Some(tx) = inner.pulls.lock().get(&to).filter(|t| !t.is_closed()).cloned() else {
        return false;
    };
    tracing::debug!(peer = format!("{to:x}"), "peer: sending over the stream the peer opened");
    let mut q = QueueStream { rx: rx.clone() };
    let until = tokio::time::Instant::now() + PULL_TURN;
    loop {
        let batch = tokio::select! {
            b = q.next() => b,
            _ = tokio::time::sleep_until(until) => return true,
        };
        let Some(batch) = batch else { return true };
        if tx.send(batch).await.is_err() {
            inner.pulls.lock().remove(&to);
            return true;
        }
    }
}

/// Keeps a reverse stream open to `peer`, stepping what comes on it into the node.
async fn pull_loop(inner: Arc<Inner>, peer: u64) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if !inner.is_member(peer) {
            inner.pulling.lock().remove(&peer);
            return;
        }
        let (Some(url), Some(node)) = (inner.peer_url(peer), inner.node.get().cloned()) else {
            tokio::time::sleep(backoff).await;
            continue;
        };
        if let Ok(ch) = inner.dialer.channel(&url) {
            let req = with_cluster(RaftPullRequest { from: inner.self_id }, inner.cluster_id);
            if let Ok(resp) = client(ch).raft_pull(req).await {
                backoff = Duration::from_millis(100);
                let mut s = resp.into_inner();
                while let Ok(Some(batch)) = s.message().await {
                    if step_batch(&node, batch).is_err() {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// How often a peer is probed (etcd's prober interval: its 5 s connection read timeout less 1 s).
const PROBE_INTERVAL: Duration = Duration::from_secs(4);

/// Measures the round trip to `peer` every [`PROBE_INTERVAL`] while it is a member, as etcd's
/// prober does, into `etcd_network_peer_round_trip_time_seconds{To}` (an unanswered probe is not
/// counted). One probe at a time per peer.
async fn probe_loop(t: PeerTransport, peer: u64) {
    let label = format!("{peer:x}");
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        if !t.inner.is_member(peer) {
            t.inner.probing.lock().remove(&peer);
            return;
        }
        let Ok(mut c) = t.member_client(peer) else { continue };
        let t0 = std::time::Instant::now();
        let probe = c.probe(with_cluster(PeerAck {}, t.inner.cluster_id));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), probe).await {
            keel_metrics::METRICS.peer_round_trip.with_label_values(&[&label]).observe(t0.elapsed().as_secs_f64());
        }
    }
}

/// Hands a batch of raft messages to the node (a busy node drops them: raft retries).
fn step_batch(node: &NodeHandle, batch: RaftBatch) -> Result<(), Status> {
    for b in batch.messages {
        let m = keel_raft::wire::message(&b).map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
        keel_metrics::METRICS.peer_received_bytes.with_label_values(&[&format!("{:x}", m.from)]).inc_by(b.len() as u64);
        let _ = node.step(m);
    }
    Ok(())
}

struct QueueStream {
    rx: Arc<Mutex<mpsc::Receiver<Vec<u8>>>>,
}

impl futures::Stream for QueueStream {
    type Item = RaftBatch;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<RaftBatch>> {
        let mut rx = self.rx.lock();
        let first = match rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(m)) => m,
            std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
            std::task::Poll::Pending => return std::task::Poll::Pending,
        };
        let mut size = first.len();
        let mut batch = vec![first];
        while size < BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) => {
                    size += m.len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        std::task::Poll::Ready(Some(RaftBatch { messages: batch }))
    }
}

/// Sends a raft snapshot message to its follower together with this member's backend, read
/// in one consistent transaction at least as new as the snapshot.
async fn send_snapshot(inner: Arc<Inner>, m: Message) {
    let to = m.to;
    let index = m.get_snapshot().get_metadata().index;
    let peer = format!("{to:x}");
    let ok = match snapshot_stream(&inner, m).await {
        Ok(()) => {
            tracing::info!(peer = %peer, index, "peer: sent snapshot");
            keel_metrics::METRICS.snapshot_send_success.with_label_values(&[&peer]).inc();
            true
        }
        Err(e) => {
            tracing::warn!(peer = %peer, index, error = format!("{e:#}"), "peer: sending snapshot failed");
            keel_metrics::METRICS.snapshot_send_failures.with_label_values(&[&peer]).inc();
            false
        }
    };
    if let Some(n) = inner.node.get() {
        n.report_snapshot(to, ok);
    }
}

async fn snapshot_stream(inner: &Arc<Inner>, m: Message) -> Result<()> {
    let to = m.to;
    let url = inner.peer_url(to).ok_or_else(|| anyhow!("unknown peer {to:x}"))?;
    // The commit fsyncs the backend: on a blocking thread, never on the peer runtime's workers,
    // which carry every peer's heartbeats.
    let store = inner.store.clone();
    tokio::task::spawn_blocking(move || store.commit())
        .await
        .map_err(|e| anyhow!("commit task: {e}"))?
        .context("commit before snapshot")?;
    let backend: Backend = inner.store.read().backend();
    let msg = m.write_to_bytes().context("encode snapshot message")?;
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    tx.send(SnapshotChunk { message: msg, ..Default::default() }).await.map_err(|_| anyhow!("stream closed"))?;
    let dump = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let mut size = 0usize;
        let meta = backend.dump(|table, k, v| {
            size += k.len() + v.len() + 8;
            buf.push(BackendRecord { table, key: k.to_vec(), value: v.to_vec() });
            if size >= CHUNK_BYTES {
                size = 0;
                let records = std::mem::take(&mut buf);
                return tx.blocking_send(SnapshotChunk { records, ..Default::default() }).is_ok();
            }
            true
        })?;
        let last = SnapshotChunk {
            records: buf,
            done: true,
            consistent_index: meta.consistent_index,
            term: meta.term,
            current_revision: meta.current_rev,
            compacted_revision: meta.compacted_rev,
            ..Default::default()
        };
        tx.blocking_send(last).map_err(|_| keel_mvcc::backend::BackendError { path: PathBuf::new(), msg: "stream closed".into() })?;
        Ok::<_, keel_mvcc::backend::BackendError>(())
    });
    let mut c = client(inner.dialer.channel(&url)?);
    let res = c.snapshot(with_cluster(ReceiverStream::new(rx), inner.cluster_id)).await;
    dump.await.map_err(|e| anyhow!("dump task: {e}"))??;
    res.map_err(|s| anyhow!("{}", s.message()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// The most bytes of records a received snapshot may hold with backend quota `quota` (as
/// reported: 0 is already etcd's 2 GiB default): twice the quota, or no bound when the quota is
/// off (negative), since a leader without a quota can hold any amount.
pub fn snapshot_limit(quota: i64) -> Option<u64> {
    (quota > 0).then(|| (quota as u64).saturating_mul(2))
}

/// What another member may ask of this one through the peer service: the requests only the
/// leader can answer, forwarded by followers. The server implements it; the transport knows
/// nothing of the client API.
#[tonic::async_trait]
pub trait Forwarded: Send + Sync + 'static {
    /// Promotes learner `id` (leader only: it knows the learner's progress).
    async fn promote(&self, id: u64) -> Result<keel_proto::etcdserverpb::MemberPromoteResponse, Status>;
    /// Renews lease `id` on this member, which must lead.
    fn lease_renew(&self, id: i64) -> Result<keel_proto::etcdserverpb::LeaseKeepAliveResponse, Status>;
    /// A lease's remaining TTL, answered by this member, which must lead.
    fn lease_time_to_live(
        &self,
        r: &keel_proto::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<keel_proto::etcdserverpb::LeaseTimeToLiveResponse, Status>;
}

pub struct PeerService {
    pub cluster_id: u64,
    pub node: NodeHandle,
    pub members: Arc<RwLock<Members>>,
    pub snap_dir: PathBuf,
    /// This member, for the requests other members forward to it.
    pub forwarded: Arc<dyn Forwarded>,
    /// Where reverse streams opened by peers are registered.
    pub transport: PeerTransport,
    /// Most bytes of records a received snapshot may hold (twice the backend quota: a leader's
    /// backend cannot grow much past its quota); a larger one is refused before it is installed.
    /// None with the quota off (`--quota-backend-bytes` negative): the disk is the only bound.
    pub max_snapshot_bytes: Option<u64>,
}

impl PeerService {
    /// Receives the backend that follows a snapshot message into `<index>.snap.db` in the snap
    /// directory and hands both to raft. Whatever fails, the partly received file is removed.
    async fn receive_snapshot(&self, msg: Message, mut s: Streaming<SnapshotChunk>) -> Result<(), Status> {
        let t0 = std::time::Instant::now();
        let index = msg.get_snapshot().get_metadata().index;
        let tmp = self.snap_dir.join(format!("{index:016x}.snap.db.tmp"));
        let fin = self.snap_dir.join(format!("{index:016x}.snap.db"));
        let _ = std::fs::remove_file(&tmp);
        // Removes the partly received file on every way out but the last.
        let cleanup = scopeguard::guard(tmp.clone(), |t| {
            let _ = std::fs::remove_file(t);
        });
        let internal = |e: keel_mvcc::backend::BackendError| Status::internal(e.to_string());
        let backend = Backend::open(&tmp).map_err(internal)?;
        let mut done = false;
        let mut received = 0u64;
        while let Some(chunk) = s.message().await? {
            received += chunk.records.iter().map(|r| (r.key.len() + r.value.len()) as u64).sum::<u64>();
            if let Some(limit) = self.max_snapshot_bytes.filter(|l| received > *l) {
                drop(backend);
                tracing::warn!(index, received, limit, "peer: refused a snapshot larger than twice the backend quota");
                return Err(Status::resource_exhausted(format!("snapshot larger than {limit} bytes (twice --quota-backend-bytes)")));
            }
            let records: Vec<(u32, Vec<u8>, Vec<u8>)> = chunk.records.into_iter().map(|r| (r.table, r.key, r.value)).collect();
            let meta = chunk.done.then_some(Meta {
                consistent_index: chunk.consistent_index,
                term: chunk.term,
                current_rev: chunk.current_revision,
                compacted_rev: chunk.compacted_revision,
            });
            let b = backend.clone();
            tokio::task::spawn_blocking(move || b.load(&records, meta.as_ref()))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(internal)?;
            if chunk.done {
                done = true;
                break;
            }
        }
        drop(backend);
        if !done {
            return Err(Status::aborted("snapshot stream ended early"));
        }
        std::fs::rename(&tmp, &fin).map_err(|e| Status::internal(e.to_string()))?;
        scopeguard::ScopeGuard::into_inner(cleanup);
        keel_metrics::METRICS.snap_db_save.observe(t0.elapsed().as_secs_f64());
        tracing::info!(index, file = %fin.display(), "peer: received snapshot with backend");
        self.node.install_snapshot(msg, fin).map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
        Ok(())
    }

    fn check_cluster<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let theirs = r.metadata().get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok()).and_then(|s| u64::from_str_radix(s, 16).ok());
        match theirs {
            Some(id) if id == self.cluster_id => Ok(()),
            Some(id) => {
                tracing::warn!(
                    local = format!("{:x}", self.cluster_id),
                    remote = format!("{id:x}"),
                    "peer: request from another cluster rejected"
                );
                Err(Status::failed_precondition("etcdserver: cluster ID mismatch"))
            }
            None => Err(Status::failed_precondition("etcdserver: cluster ID mismatch")),
        }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<PeerAck>, Status> {
        self.check_cluster(&req)?;
        let mut s = req.into_inner();
        while let Some(batch) = s.message().await? {
            step_batch(&self.node, batch)?;
        }
        Ok(Response::new(PeerAck {}))
    }

    type RaftPullStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftBatch, Status>> + Send>>;

    async fn raft_pull(&self, req: Request<RaftPullRequest>) -> Result<Response<Self::RaftPullStream>, Status> {
        self.check_cluster(&req)?;
        let from = req.into_inner().from;
        if self.members.read().get(from).is_none() {
            return Err(Status::permission_denied("etcdserver: not a member of this cluster"));
        }
        let rx = self.transport.register_pull(from);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok))))
    }

    async fn snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<PeerAck>, Status> {
        self.check_cluster(&req)?;
        let mut s = req.into_inner();
        let first = s.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let msg = keel_raft::wire::message(&first.message).map_err(|e| Status::invalid_argument(format!("bad snapshot message: {e}")))?;
        let from = format!("{:x}", msg.from);
        match self.receive_snapshot(msg, s).await {
            Ok(()) => {
                keel_metrics::METRICS.snapshot_receive_success.with_label_values(&[&from]).inc();
                Ok(Response::new(PeerAck {}))
            }
            Err(e) => {
                keel_metrics::METRICS.snapshot_receive_failures.with_label_values(&[&from]).inc();
                Err(e)
            }
        }
    }

    async fn promote(
        &self,
        req: Request<keel_proto::etcdserverpb::MemberPromoteRequest>,
    ) -> Result<Response<keel_proto::etcdserverpb::MemberPromoteResponse>, Status> {
        self.check_cluster(&req)?;
        let id = req.into_inner().id;
        Ok(Response::new(self.forwarded.promote(id).await?))
    }

    async fn lease_renew(
        &self,
        req: Request<keel_proto::etcdserverpb::LeaseKeepAliveRequest>,
    ) -> Result<Response<keel_proto::etcdserverpb::LeaseKeepAliveResponse>, Status> {
        self.check_cluster(&req)?;
        let id = req.into_inner().id;
        Ok(Response::new(self.forwarded.lease_renew(id)?))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<keel_proto::etcdserverpb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<keel_proto::etcdserverpb::LeaseTimeToLiveResponse>, Status> {
        self.check_cluster(&req)?;
        Ok(Response::new(self.forwarded.lease_time_to_live(req.get_ref())?))
    }

    async fn probe(&self, req: Request<PeerAck>) -> Result<Response<PeerAck>, Status> {
        self.check_cluster(&req)?;
        Ok(Response::new(PeerAck {}))
    }

    async fn members(&self, _req: Request<MembersRequest>) -> Result<Response<SnapshotData>, Status> {
        let m = self.members.read();
        Ok(Response::new(SnapshotData { cluster_id: m.cluster_id, members: m.members.clone() }))
    }
}

//! etcd's raft streams, both ends. The receiver of a stream opens it (`GET
//! /raft/stream/{msgapp,message}/<its id>` on the sender's peer URL); the sender answers 200 and
//! from then on writes frames ([`crate::rafthttp::codec`]) into the answer's body for as long as
//! the connection lives.
//!
//! - [`Outgoing`]: the body of the answer to a stream request, fed by the link's queue for that
//!   stream: each poll takes every queued message (up to [`FRAME_BYTES`]) and encodes them into
//!   one chunk, so a burst costs one write; a link heartbeat every [`HEARTBEAT`] keeps an idle
//!   stream alive (etcd's `ConnReadTimeout / 3`).
//! - [`read_loop`]: opens a stream on a peer, hands what arrives to raft, and opens it again
//!   100 ms after it breaks; a stream silent for [`READ_TIMEOUT`] is broken (etcd's
//!   `ConnReadTimeout`).
//!
//! Owns the stream connections. Calls the codec, the handshake rules, the node (step) and the
//! link's state.

use crate::rafthttp::codec::{is_link_heartbeat, link_heartbeat, CodecError, MessageCodec, MsgAppV2Codec};
use crate::rafthttp::handshake::{self, id_string, StreamKind};
use crate::rafthttp::reader;
use crate::rafthttp::transport::{Link, Shared};
use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, Empty};
use keel_raft::eraftpb::Message;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder};

/// A stream with nothing on it for this long is broken (etcd's `ConnReadTimeout`).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an outgoing stream carries a link heartbeat.
pub const HEARTBEAT: Duration = Duration::from_millis(5000 / 3);
/// Most bytes encoded into one chunk of an outgoing stream.
pub const FRAME_BYTES: usize = 1 << 20;
/// Pause before a broken stream is opened again (etcd's stream reader's rate limit).
const REDIAL: Duration = Duration::from_millis(100);

pub(crate) enum Codec {
    MsgApp(MsgAppV2Codec),
    Message(MessageCodec),
}

impl Codec {
    pub(crate) fn new(kind: StreamKind, local: u64, remote: u64) -> Codec {
        match kind {
            StreamKind::MsgAppV2 => Codec::MsgApp(MsgAppV2Codec::new(local, remote)),
            StreamKind::Message => Codec::Message(MessageCodec::default()),
        }
    }

    pub(crate) fn encode(&mut self, m: &Message, dst: &mut BytesMut) -> Result<(), CodecError> {
        match self {
            Codec::MsgApp(c) => c.encode(m, dst),
            Codec::Message(c) => c.encode(m, dst),
        }
    }

    pub(crate) fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CodecError> {
        match self {
            Codec::MsgApp(c) => c.decode(src),
            Codec::Message(c) => c.decode(src),
        }
    }
}

/// The body of this member's answer to a peer's stream request: the peer's messages of that
/// stream, as they are sent. Ends when the link's queue for it is replaced or dropped.
pub struct Outgoing {
    shared: Arc<Shared>,
    link: Arc<Link>,
    kind: StreamKind,
    rx: mpsc::Receiver<Message>,
    codec: Codec,
    heartbeat: tokio::time::Interval,
    buf: BytesMut,
}

impl Outgoing {
    /// The stream `kind` peer `from` asked for, now attached to its link; None when `from` is
    /// not a member.
    pub(crate) fn attach(shared: &Arc<Shared>, from: u64, kind: StreamKind) -> Option<Outgoing> {
        let (link, rx) = shared.attach(from, kind)?;
        link.stream_up(shared.id);
        tracing::info!(remote_peer_id = %link.label, stream_type = kind.name(), "established TCP streaming connection with remote peer (writer)");
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(Outgoing { codec: Codec::new(kind, shared.id, from), shared: shared.clone(), link, kind, rx, heartbeat, buf: BytesMut::new() })
    }

    fn encode(&mut self, m: &Message) {
        if let Err(e) = self.codec.encode(m, &mut self.buf) {
            tracing::error!(remote_peer_id = %self.link.label, error = %e, "cannot encode a raft message");
        }
    }
}

impl http_body::Body for Outgoing {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let mut ended = false;
        while this.buf.len() < FRAME_BYTES {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(m)) => this.encode(&m),
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if this.buf.is_empty() && !ended && this.heartbeat.poll_tick(cx).is_ready() {
            this.encode(&link_heartbeat());
        }
        if !this.buf.is_empty() {
            let chunk = this.buf.split().freeze();
            this.link.sent_bytes.inc_by(chunk.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if ended {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.link.stream_down(self.shared.id);
        tracing::warn!(remote_peer_id = %self.link.label, stream_type = self.kind.name(), "lost TCP streaming connection with remote peer (writer)");
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("the member has been permanently removed from the cluster")]
    Removed,
    #[error("incompatible version")]
    IncompatibleVersion,
    #[error("cluster ID mismatch")]
    ClusterIdMismatch,
    #[error("{0}")]
    Other(String),
}

impl From<anyhow::Error> for OpenError {
    fn from(e: anyhow::Error) -> OpenError {
        OpenError::Other(format!("{e:#}"))
    }
}

impl From<hyper::Error> for OpenError {
    fn from(e: hyper::Error) -> OpenError {
        OpenError::Other(error_text(&e))
    }
}

/// An HTTP error with its causes. With TLS 1.3 a peer that refuses this member's certificate
/// says so only after the handshake, as an alert the first read meets, deep in the causes of
/// hyper's "connection error": that is given in etcd's (Go's) words, which operators and etcd's
/// tests look for.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        // rustls' error travels inside an io::Error, whose source() skips it.
        let tls = c
            .downcast_ref::<rustls::Error>()
            .or_else(|| c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<rustls::Error>()));
        let refused = tls.is_some_and(|r| matches!(r, rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)));
        if refused {
            return "remote error: tls: bad certificate".to_string();
        }
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// Opens stream `kind` from `link`'s peer at `url`: the answer's body once it is 200.
async fn open(shared: &Shared, peer: u64, kind: StreamKind, url: &str) -> Result<hyper::body::Incoming, OpenError> {
    let (io, host) = shared.dialer.connect_io(url).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::get(kind.path(shared.id)).header(http::header::HOST, host);
    for (name, value) in handshake::stream_request_headers(shared.id, shared.cluster_id, peer, &shared.urls) {
        req = req.header(name, value);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| OpenError::Other(e.to_string()))?;
    let resp = tokio::time::timeout(READ_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| OpenError::Other("timed out waiting for the stream's answer".into()))??;
    match resp.status().as_u16() {
        200 => Ok(resp.into_body()),
        status => {
            let body = if status == 412 {
                tokio::time::timeout(READ_TIMEOUT, resp.into_body().collect())
                    .await
                    .map_err(|_| OpenError::Other("timed out reading a refusal".into()))??
                    .to_bytes()
            } else {
                Bytes::new()
            };
            Err(refusal(status, &body, shared.id, peer))
        }
    }
}

/// What a peer's answer other than 200 to a stream request means (`body` only read for 412).
pub(crate) fn refusal(status: u16, body: &[u8], local: u64, peer: u64) -> OpenError {
    match status {
        410 => OpenError::Removed,
        404 => OpenError::Other(format!("peer {} failed to find local node {}", id_string(peer), id_string(local))),
        412 => match String::from_utf8_lossy(body).trim_end_matches('\n') {
            "incompatible version" => OpenError::IncompatibleVersion,
            "cluster ID mismatch" => OpenError::ClusterIdMismatch,
            other => OpenError::Other(format!("unhandled error {other:?} when precondition failed")),
        },
        other => OpenError::Other(format!("unhandled http status {other}")),
    }
}

/// Reads an open stream into raft until it breaks; why it broke.
async fn read(shared: &Shared, link: &Link, kind: StreamKind, mut body: hyper::body::Incoming) -> String {
    let mut codec = Codec::new(kind, shared.id, link.id);
    let mut buf = BytesMut::new();
    let received = keel_metrics::METRICS.peer_received_bytes.with_label_values(&[&link.label]);
    let mut dropped = 0u64;
    loop {
        let frame = match tokio::time::timeout(READ_TIMEOUT, body.frame()).await {
            Err(_) => return "read timed out".into(),
            Ok(None) => return "EOF".into(),
            Ok(Some(Err(e))) => return e.to_string(),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        received.inc_by(data.len() as u64);
        buf.extend_from_slice(&data);
        loop {
            let m = match codec.decode(&mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return e.to_string(),
            };
            if is_link_heartbeat(&m) {
                continue;
            }
            let Some(node) = shared.node() else { continue };
            if node.step(m).is_err() {
                dropped += 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(remote_peer_id = %link.label, dropped, "dropped internal Raft message since receiving buffer is full (overloaded network)");
                }
            }
        }
    }
}

/// An open incoming stream: read by the raft thread, or here from the HTTP answer's body.
enum Session {
    RaftThread(tokio::sync::oneshot::Receiver<String>),
    Body(hyper::body::Incoming),
}

/// Keeps stream `kind` from `link`'s peer open while the peer is a member.
pub(crate) async fn read_loop(shared: Arc<Shared>, link: Arc<Link>, kind: StreamKind) {
    let mut turn = 0usize;
    // The last failure logged: a failure is logged once per outage and again when it changes
    // (a peer first not listening, then refusing this member's certificate: etcd's operators and
    // tests look for "remote error: tls: bad certificate").
    let mut down: Option<String> = None;
    loop {
        let urls = shared.peer_urls(link.id);
        if urls.is_empty() {
            return;
        }
        let url = &urls[turn % urls.len()];
        let opened = match reader::open(&shared, &link, kind, url).await {
            Ok(Some(ended)) => Ok(Session::RaftThread(ended)),
            Ok(None) => open(&shared, link.id, kind, url).await.map(Session::Body),
            Err(e) => Err(e),
        };
        match opened {
            Ok(session) => {
                link.stream_up(shared.id);
                tracing::info!(remote_peer_id = %link.label, stream_type = kind.name(), "established TCP streaming connection with remote peer (reader)");
                down = None;
                let why = match session {
                    Session::RaftThread(ended) => ended.await.unwrap_or_else(|_| "the raft thread stopped".into()),
                    Session::Body(body) => read(&shared, &link, kind, body).await,
                };
                link.stream_down(shared.id);
                if shared.is_member(link.id) {
                    tracing::warn!(remote_peer_id = %link.label, stream_type = kind.name(), error = %why, "lost TCP streaming connection with remote peer (reader)");
                }
            }
            Err(OpenError::Removed) => {
                tracing::error!(remote_peer_id = %link.label, "the member has been permanently removed from the cluster");
                shared.removed();
                return;
            }
            Err(e) => {
                turn += 1;
                let text = e.to_string();
                if down.as_deref() != Some(text.as_str()) {
                    down = Some(text);
                    match e {
                        OpenError::ClusterIdMismatch => tracing::error!(
                            remote_peer_id = %link.label,
                            local_member_cluster_id = %id_string(shared.cluster_id),
                            "request sent was ignored by remote peer due to cluster ID mismatch"
                        ),
                        OpenError::IncompatibleVersion => tracing::error!(
                            remote_peer_id = %link.label,
                            "request sent was ignored by remote peer due to server version incompatibility"
                        ),
                        e => {
                            tracing::warn!(remote_peer_id = %link.label, stream_type = kind.name(), url, error = %e, "failed to dial remote peer")
                        }
                    }
                } else {
                    tracing::debug!(remote_peer_id = %link.label, url, error = %e, "failed to dial remote peer");
                }
            }
        }
        if !shared.is_member(link.id) {
            return;
        }
        tokio::time::sleep(REDIAL).await;
    }
}

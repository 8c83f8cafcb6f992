//! Outgoing raft streams whose socket this member writes itself: the fast path of
//! [`crate::rafthttp::stream`] for peers that open their streams over plain TCP.
//!
//! A peer connection is offered here before any HTTP server sees it ([`offer`]). If its first
//! request is a stream request this member accepts (`GET /raft/stream/...`, checked by the same
//! rules as on the HTTP path), the connection is kept: the answer's head (200, chunked body) is
//! written, and from then on the raft thread encodes its messages for that peer and writes them
//! to the socket itself, one HTTP chunk per batch, in the same call that sends them
//! ([`DirectWriter::push`], [`DirectWriter::flush`]): no queue, no task, no thread woken on the
//! sending side. Only what the socket does not take at once (a full send buffer) is left for the
//! connection's task, which writes it when the socket can take more; while anything waits there,
//! new batches queue behind it, so the stream's order holds. The task also sends the link
//! heartbeat on an idle stream and notices the peer hanging up. Any other first request goes on
//! to the HTTP server with the bytes read so far.
//!
//! Owns the kept connections. Calls the codec, the handshake rules and the link's state.

use crate::rafthttp::handshake::{self, accept_stream, StreamKind};
use crate::rafthttp::stream::{link_heartbeat, Codec, HEARTBEAT};
use crate::rafthttp::transport::{Link, Shared};
use bytes::{Buf, BytesMut};
use keel_raft::eraftpb::Message;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Most bytes of a request head read before deciding (etcd's peers send well under 1 KiB).
const HEAD_LIMIT: usize = 16 << 10;
/// How long a new connection has to send its first request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes waiting for the socket on one stream: past it messages are dropped (raft sends
/// them again), as a full stream queue drops them on the HTTP path.
const PENDING_LIMIT: usize = 64 << 20;
/// What a stream request starts with.
const STREAM_PREFIX: &[u8] = b"GET /raft/stream/";

/// An outgoing stream on a kept connection.
pub(crate) struct DirectWriter {
    sock: TcpStream,
    state: Mutex<State>,
    closed: AtomicBool,
    /// Wakes the connection's task: bytes wait for the socket, or the stream is closed.
    wake: tokio::sync::Notify,
}

struct State {
    codec: Codec,
    /// Frames of the batch being made (the raft thread's current send).
    batch: BytesMut,
    /// Bytes the socket has not taken yet, in order.
    pending: BytesMut,
    /// When something was last written (link heartbeats go on idle streams only).
    last: Instant,
}

impl DirectWriter {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the stream (its task closes the connection).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Adds `m` to the batch; false when the stream is closed or too far behind (the message is
    /// not sent).
    pub(crate) fn push(&self, m: &Message) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut st = self.state.lock();
        if st.pending.len() > PENDING_LIMIT {
            return false;
        }
        let st = &mut *st;
        if let Err(e) = st.codec.encode(m, &mut st.batch) {
            tracing::error!(error = %e, "cannot encode a raft message");
        }
        true
    }

    /// Writes the batch as one chunk: straight to the socket when nothing waits before it;
    /// what the socket does not take is left for the connection's task. Returns the bytes.
    pub(crate) fn flush(&self) -> usize {
        let mut st = self.state.lock();
        if st.batch.is_empty() {
            return 0;
        }
        let st = &mut *st;
        let mut chunk = BytesMut::with_capacity(st.batch.len() + 20);
        chunk.extend_from_slice(format!("{:x}\r\n", st.batch.len()).as_bytes());
        chunk.extend_from_slice(&st.batch);
        chunk.extend_from_slice(b"\r\n");
        st.batch.clear();
        st.last = Instant::now();
        let n = chunk.len();
        if !st.pending.is_empty() {
            st.pending.extend_from_slice(&chunk);
            return n;
        }
        match self.sock.try_write(&chunk) {
            Ok(w) if w == chunk.len() => {}
            Ok(w) => {
                st.pending.extend_from_slice(&chunk[w..]);
                self.wake.notify_one();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                st.pending.extend_from_slice(&chunk);
                self.wake.notify_one();
            }
            Err(_) => {
                self.closed.store(true, Ordering::Release);
                self.wake.notify_one();
            }
        }
        n
    }

    /// Writes what waits until the socket stops taking it; Err when the connection failed.
    async fn drain(&self) -> std::io::Result<()> {
        loop {
            {
                let mut st = self.state.lock();
                if st.pending.is_empty() {
                    return Ok(());
                }
                match self.sock.try_write(&st.pending) {
                    Ok(n) => {
                        st.pending.advance(n);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            self.sock.writable().await?;
        }
    }
}

/// Reads a connection's first request head (or as much as shows it is not a stream request).
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 2048];
    loop {
        let n = STREAM_PREFIX.len().min(buf.len());
        if buf[..n] != STREAM_PREFIX[..n] {
            return Ok(false);
        }
        if buf.len() >= STREAM_PREFIX.len() && buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(true);
        }
        if buf.len() >= HEAD_LIMIT {
            return Ok(false);
        }
        let got = sock.read(&mut chunk).await?;
        if got == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// Offers a new plain-TCP peer connection to the direct streams: `Ok` when it was taken as an
/// outgoing stream, else the connection and the bytes read from it, for the HTTP server.
pub(crate) async fn offer(shared: &Arc<Shared>, mut sock: TcpStream) -> Result<(), (TcpStream, Vec<u8>)> {
    let mut head = Vec::new();
    match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut sock, &mut head)).await {
        Ok(Ok(true)) => {}
        _ => return Err((sock, head)),
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (Ok(httparse::Status::Complete(_)), Some(method), Some(path)) = (req.parse(&head), req.method, req.path) else {
        return Err((sock, head));
    };
    let header = |name: &str| {
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).and_then(|h| std::str::from_utf8(h.value).ok()).map(str::to_string)
    };
    // Refusals and anything unusual are the HTTP path's to answer.
    let Ok(accepted) = accept_stream(shared.id, shared.cluster_id, method, path, header, |id| shared.sender(id)) else {
        return Err((sock, head));
    };
    let answer = format!(
        "HTTP/1.1 200 OK\r\nX-Server-Version: {}\r\nX-Etcd-Cluster-Id: {}\r\nDate: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        handshake::SERVER_VERSION,
        handshake::id_string(shared.cluster_id),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    );
    let writer = Arc::new(DirectWriter {
        sock,
        state: Mutex::new(State {
            codec: Codec::new(accepted.kind, shared.id, accepted.from),
            batch: BytesMut::new(),
            pending: BytesMut::from(answer.as_bytes()),
            last: Instant::now(),
        }),
        closed: AtomicBool::new(false),
        wake: tokio::sync::Notify::new(),
    });
    let Some(link) = shared.attach_direct(accepted.from, accepted.kind, writer.clone()) else {
        // No longer a member: nothing was written; the HTTP path answers.
        let Ok(w) = Arc::try_unwrap(writer) else { return Ok(()) };
        return Err((w.sock, head));
    };
    tokio::spawn(run(shared.clone(), link, accepted.kind, writer));
    Ok(())
}

/// The connection's task: writes what the raft thread left, the link heartbeat on an idle
/// stream, and ends the stream when the peer hangs up or it is closed.
async fn run(shared: Arc<Shared>, link: Arc<Link>, kind: StreamKind, w: Arc<DirectWriter>) {
    link.stream_up(shared.id);
    tracing::info!(remote_peer_id = %link.label, stream_type = kind.name(), "established TCP streaming connection with remote peer (writer)");
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = [0u8; 512];
    let sent = keel_metrics::METRICS.peer_sent_bytes.with_label_values(&[&link.label]);
    let why = loop {
        if w.is_closed() {
            break "closed".to_string();
        }
        if let Err(e) = w.drain().await {
            break e.to_string();
        }
        tokio::select! {
            _ = w.wake.notified() => {}
            _ = heartbeat.tick() => {
                let idle = w.state.lock().last.elapsed() >= HEARTBEAT;
                if idle && w.push(&link_heartbeat()) {
                    sent.inc_by(w.flush() as u64);
                }
            }
            r = w.sock.readable() => {
                if let Err(e) = r {
                    break e.to_string();
                }
                // A stream's receiver sends nothing after its request: bytes are ignored, the
                // end of the connection ends the stream.
                match w.sock.try_read(&mut scratch) {
                    Ok(0) => break "EOF".to_string(),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => break e.to_string(),
                }
            }
        }
    };
    w.closed.store(true, Ordering::Release);
    shared.detach_direct(&link, kind, &w);
    link.stream_down(shared.id);
    tracing::warn!(remote_peer_id = %link.label, stream_type = kind.name(), error = %why, "lost TCP streaming connection with remote peer (writer)");
}

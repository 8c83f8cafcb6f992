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

use crate::rafthttp::codec::link_heartbeat;
use crate::rafthttp::handshake::{self, accept_stream, StreamKind};
use crate::rafthttp::stream::{Codec, HEARTBEAT};
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
                    link.sent_bytes.inc_by(w.flush() as u64);
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

#[cfg(test)]
mod tests {
    use crate::rafthttp::codec::MessageCodec;
    use crate::rafthttp::reader::Dechunker;
    use crate::rafthttp::testing::{peer_headers, with_transport, CLUSTER};
    use bytes::BytesMut;
    use keel_raft::eraftpb::{Message, MessageType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::codec::Decoder;

    fn stream_request(cluster: u64) -> Vec<u8> {
        let mut r = String::from("GET /raft/stream/message/2 HTTP/1.1\r\nHost: m1\r\nX-Raft-To: 1\r\n");
        for (k, v) in peer_headers(cluster) {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    async fn read_until(c: &mut TcpStream, buf: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) {
        let mut b = [0u8; 4096];
        while !done(buf) {
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "EOF after {:?}", String::from_utf8_lossy(buf));
            buf.extend_from_slice(&b[..n]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_over_plain_tcp_is_written_by_the_sender_itself_and_anything_else_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (h, mut t) = with_transport(true, dir.path());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (offered, mut outcome) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let _ = offered.send(h.offer_stream(s).await.err().map(|(_, head)| head));
            }
        });

        // A stream request is taken: the answer's head, then each send's messages as one chunk.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&stream_request(CLUSTER)).await.unwrap();
        let mut got = Vec::new();
        read_until(&mut c, &mut got, |b| b.windows(4).any(|w| w == b"\r\n\r\n")).await;
        let head = String::from_utf8_lossy(&got).into_owned();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nTransfer-Encoding: chunked\r\n") && head.contains("\r\nX-Etcd-Cluster-Id: c1\r\n"), "{head}");
        assert_eq!(outcome.recv().await.unwrap(), None, "the connection was taken");
        assert!(t.active_since(2).is_some(), "the peer is active while its stream is open");
        let mut msgs = Vec::new();
        for commit in 1..=2 {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgHeartbeat);
            (m.from, m.to, m.term, m.commit) = (1, 2, 3, commit);
            msgs.push(m);
        }
        keel_raft::Transport::send(&mut t, msgs.clone());
        let mut body = Vec::new();
        read_until(&mut c, &mut body, |b| b.ends_with(b"\r\n") && b.len() > 4).await;
        let size = std::str::from_utf8(&body[..body.iter().position(|b| *b == b'\r').unwrap()]).unwrap().to_string();
        let mut frames = BytesMut::new();
        assert!(!Dechunker::default().feed(&body, &mut frames).unwrap());
        assert_eq!(usize::from_str_radix(&size, 16).unwrap(), frames.len(), "one chunk holds the send's messages");
        let mut codec = MessageCodec::default();
        let decoded: Vec<Message> = std::iter::from_fn(|| codec.decode(&mut frames).unwrap()).collect();
        assert_eq!(decoded, msgs);

        // The peer hangs up: the stream ends and the link knows it.
        drop(c);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while t.active_since(2).is_some() {
            assert!(std::time::Instant::now() < deadline, "the stream outlived its connection");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }

        // Anything else goes on to the HTTP server with every byte read: a pipeline request as
        // soon as it shows it is not a stream, a stream refused (here: another cluster) whole.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"POST /raft HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
        let head = outcome.recv().await.unwrap().expect("not taken");
        assert!(!head.is_empty() && b"POST /raft HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".starts_with(&head), "{head:?}");
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        c2.write_all(&stream_request(0xc2)).await.unwrap();
        assert_eq!(outcome.recv().await.unwrap(), Some(stream_request(0xc2)));
        drop((c, c2));
    }
}

//! Incoming raft streams the raft thread reads itself: the fast path of
//! [`crate::rafthttp::stream`] for peers reached over plain TCP.
//!
//! The stream's request is written and its answer's head read here, on the peer runtime
//! ([`open`]); a 200 hands the connection to the raft thread ([`Readers`], through the
//! transport's [`keel_raft::Transport::receive`]), which watches it in the same poll as its
//! inbox, reads it when it is readable, takes the HTTP body's chunked framing off
//! ([`Dechunker`]) and steps each message into raft: a message from a peer wakes one thread, the
//! one that handles it. When the stream ends (end of body, a read error, a bad frame, nothing
//! for [`READ_TIMEOUT`]) the raft thread drops the connection and tells the stream's task why,
//! which opens it again. Any other answer is the HTTP path's.
//!
//! Owns the connections handed to the raft thread. Calls the codec, the handshake headers, the
//! peer dialer, the link's state and the node (to wake it).

use crate::rafthttp::codec::is_link_heartbeat;
use crate::rafthttp::handshake::{self, StreamKind};
use crate::rafthttp::stream::{refusal, Codec, OpenError, READ_TIMEOUT};
use crate::rafthttp::transport::{Link, Shared};
use bytes::BytesMut;
use keel_raft::eraftpb::Message;
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// Most bytes of an answer's head (and of a refusal's body) read.
const HEAD_LIMIT: usize = 64 << 10;
/// Longest chunk-size or trailer line taken.
const LINE_LIMIT: usize = 4096;
/// How often the raft thread looks for silent streams.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// HTTP/1.1's chunked body framing, taken off as bytes arrive.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// Reading the CRLF after a chunk's data.
    DataEnd,
    /// Reading trailer lines after the last chunk.
    Trailer,
    /// The body has ended.
    Done,
}

impl Dechunker {
    /// Takes the framing off `src`, adding the body's bytes to `out`; true once the body has
    /// ended (the last chunk and the trailer read). Bytes after the end are ignored.
    pub fn feed(&mut self, mut src: &[u8], out: &mut BytesMut) -> Result<bool, String> {
        while !src.is_empty() {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Data(left) => {
                    let n = (left as usize).min(src.len());
                    out.extend_from_slice(&src[..n]);
                    src = &src[n..];
                    self.state = if left == n as u64 { ChunkState::DataEnd } else { ChunkState::Data(left - n as u64) };
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let Some(line) = self.take_line(&mut src)? else { continue };
                    self.state = match self.state {
                        ChunkState::Size => {
                            let digits = line.split(|b| *b == b';').next().unwrap_or_default();
                            let digits = std::str::from_utf8(digits).map_err(|_| "malformed chunk size".to_string())?.trim();
                            let size = u64::from_str_radix(digits, 16).map_err(|_| format!("malformed chunk size {digits:?}"))?;
                            if size == 0 {
                                ChunkState::Trailer
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => return Err("malformed chunked encoding: no CRLF after a chunk".into()),
                        _ if line.is_empty() => ChunkState::Done,
                        _ => ChunkState::Trailer,
                    };
                }
            }
        }
        Ok(self.state == ChunkState::Done)
    }

    /// A whole line (without its CRLF) once `src` completes it.
    fn take_line(&mut self, src: &mut &[u8]) -> Result<Option<Vec<u8>>, String> {
        match src.iter().position(|b| *b == b'\n') {
            Some(i) => {
                self.line.extend_from_slice(&src[..i]);
                *src = &src[i + 1..];
                if self.line.len() > LINE_LIMIT {
                    return Err("malformed chunked encoding: line too long".into());
                }
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            None => {
                self.line.extend_from_slice(src);
                *src = &[];
                if self.line.len() > LINE_LIMIT {
                    return Err("malformed chunked encoding: line too long".into());
                }
                Ok(None)
            }
        }
    }
}

/// How an answer's body is framed.
enum Framing {
    Chunked(Dechunker),
    /// No length and not chunked: the body is everything until the connection closes.
    UntilClose,
}

/// A stream the raft thread reads.
pub(crate) struct Reader {
    token: mio::Token,
    sock: mio::net::TcpStream,
    codec: Codec,
    /// Messages that came with the answer's head, for raft before any read.
    early: Vec<Message>,
    framing: Framing,
    /// Body bytes not yet a whole frame.
    body: BytesMut,
    last: Instant,
    done: oneshot::Sender<String>,
    received: keel_metrics::Counter,
}

impl Reader {
    /// Reads what the socket has; the messages for raft go to `out`. Err: why the stream ended.
    fn read(&mut self, scratch: &mut [u8], out: &mut Vec<Message>) -> Result<(), String> {
        loop {
            let n = match self.sock.read(scratch) {
                Ok(0) => return Err("EOF".into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
            };
            self.last = Instant::now();
            self.received.inc_by(n as u64);
            let ended = self.take(&scratch[..n], out)?;
            if ended {
                return Err("EOF".into());
            }
        }
    }

    /// Takes socket bytes: the framing off, messages out. True once the body has ended.
    fn take(&mut self, bytes: &[u8], out: &mut Vec<Message>) -> Result<bool, String> {
        let ended = match &mut self.framing {
            Framing::Chunked(d) => d.feed(bytes, &mut self.body)?,
            Framing::UntilClose => {
                self.body.extend_from_slice(bytes);
                false
            }
        };
        while let Some(m) = self.codec.decode(&mut self.body).map_err(|e| e.to_string())? {
            if !is_link_heartbeat(&m) {
                out.push(m);
            }
        }
        Ok(ended)
    }
}

/// The raft thread's streams (held by the transport the node was given).
#[derive(Default)]
pub(crate) struct Readers {
    by_token: HashMap<mio::Token, Reader>,
    scratch: Vec<u8>,
    checked: Option<Instant>,
}

impl Readers {
    /// Takes the streams opened since the last call, reads the ready ones, ends the silent ones.
    pub(crate) fn receive(&mut self, shared: &Shared, ready: &[mio::Token], out: &mut Vec<Message>) {
        if self.scratch.is_empty() {
            self.scratch = vec![0u8; 64 << 10];
        }
        for mut r in shared.take_arrivals() {
            let t = r.token;
            out.append(&mut r.early);
            self.by_token.insert(t, r);
            // Whatever came before the connection was taken (its events went unseen).
            self.read_one(shared, t, out);
        }
        for t in ready {
            self.read_one(shared, *t, out);
        }
        let now = Instant::now();
        if self.checked.is_none_or(|c| now.duration_since(c) >= CHECK_EVERY) {
            self.checked = Some(now);
            let silent: Vec<mio::Token> =
                self.by_token.iter().filter(|(_, r)| now.duration_since(r.last) >= READ_TIMEOUT).map(|(t, _)| *t).collect();
            for t in silent {
                self.end(shared, t, "read timed out".into());
            }
        }
    }

    fn read_one(&mut self, shared: &Shared, t: mio::Token, out: &mut Vec<Message>) {
        let Some(r) = self.by_token.get_mut(&t) else { return };
        if let Err(why) = r.read(&mut self.scratch, out) {
            self.end(shared, t, why);
        }
    }

    fn end(&mut self, shared: &Shared, t: mio::Token, why: String) {
        if let Some(mut r) = self.by_token.remove(&t) {
            if let Some(reg) = shared.registry() {
                let _ = reg.deregister(&mut r.sock);
            }
            let _ = r.done.send(why);
        }
    }
}

/// Opens stream `kind` from `link`'s peer at `url` over plain TCP and hands it to the raft
/// thread: None when `url` is not plain TCP (or the raft thread does not read streams), else
/// what the stream's end will be told through.
pub(crate) async fn open(
    shared: &Shared,
    link: &Arc<Link>,
    kind: StreamKind,
    url: &str,
) -> Result<Option<oneshot::Receiver<String>>, OpenError> {
    let Some(registry) = shared.registry() else { return Ok(None) };
    let Some((mut sock, host)) = shared.dialer.connect_plain_tcp(url).await? else { return Ok(None) };
    let mut req = format!("GET {} HTTP/1.1\r\nHost: {host}\r\n", kind.path(shared.id));
    for (name, value) in handshake::stream_request_headers(shared.id, shared.cluster_id, link.id, &shared.urls) {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        sock.write_all(req.as_bytes()).await?;
        read_answer_head(&mut sock).await
    })
    .await
    .map_err(|_| OpenError::Other("timed out waiting for the stream's answer".into()))?
    .map_err(|e| OpenError::Other(e.to_string()))?;
    let (status, chunked, length, rest) = head;
    if status != 200 {
        let mut body = rest;
        let want = length.unwrap_or(HEAD_LIMIT).min(HEAD_LIMIT);
        let _ = tokio::time::timeout(READ_TIMEOUT, async {
            let mut chunk = [0u8; 1024];
            while body.len() < want {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let body = if chunked {
            let mut out = BytesMut::new();
            let _ = Dechunker::default().feed(&body, &mut out);
            out.to_vec()
        } else {
            body
        };
        return Err(refusal(status, &body, shared.id, link.id));
    }
    let std = sock.into_std().map_err(|e| OpenError::Other(e.to_string()))?;
    std.set_nonblocking(true).map_err(|e| OpenError::Other(e.to_string()))?;
    let mut sock = mio::net::TcpStream::from_std(std);
    let token = shared.next_token();
    registry.register(&mut sock, token, mio::Interest::READABLE).map_err(|e| OpenError::Other(e.to_string()))?;
    let (done, ended) = oneshot::channel();
    let mut reader = Reader {
        token,
        sock,
        early: Vec::new(),
        codec: Codec::new(kind, shared.id, link.id),
        framing: if chunked { Framing::Chunked(Dechunker::default()) } else { Framing::UntilClose },
        body: BytesMut::new(),
        last: Instant::now(),
        done,
        received: keel_metrics::METRICS.peer_received_bytes.with_label_values(&[&link.label]),
    };
    // Bytes that came with the head are the body's start; a bad one refuses the stream.
    let mut early = Vec::new();
    if let Err(why) = reader.take(&rest, &mut early) {
        let _ = registry.deregister(&mut reader.sock);
        return Err(OpenError::Other(why));
    }
    reader.early = early;
    shared.arrive(reader);
    if let Some(node) = shared.node() {
        node.nudge();
    }
    Ok(Some(ended))
}

/// Reads an answer's head: its status, whether the body is chunked, its length if given, and
/// the bytes read past the head.
async fn read_answer_head(sock: &mut tokio::net::TcpStream) -> std::io::Result<(u16, bool, Option<usize>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "EOF before the answer's head"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let value = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                let chunked = value("Transfer-Encoding").is_some_and(|v| v.contains("chunked"));
                let length = value("Content-Length").and_then(|v| v.trim().parse().ok());
                return Ok((status, chunked, length, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) if buf.len() < HEAD_LIMIT => continue,
            Ok(httparse::Status::Partial) => return Err(std::io::Error::other("the answer's head is too long")),
            Err(e) => return Err(std::io::Error::other(format!("malformed HTTP answer: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rafthttp::codec::MessageCodec;
    use crate::rafthttp::testing::with_peer;
    use keel_raft::eraftpb::MessageType;
    use keel_raft::Transport as _;
    use tokio_util::codec::Encoder;

    fn heartbeat(commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        (m.from, m.to, m.term, m.commit) = (2, 1, 3, commit);
        m
    }

    fn frames(msgs: &[Message]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for m in msgs {
            MessageCodec::default().encode(m, &mut b).unwrap();
        }
        b.to_vec()
    }

    fn chunk(body: &[u8]) -> Vec<u8> {
        let mut c = format!("{:x}\r\n", body.len()).into_bytes();
        c.extend_from_slice(body);
        c.extend_from_slice(b"\r\n");
        c
    }

    /// A peer that answers the first stream request with `head`, then, once told, with `rest`,
    /// and then hangs up (after the other side does, so that nothing it sent is cut off).
    async fn peer(head: Vec<u8>, rest: Vec<Vec<u8>>) -> (String, tokio::task::JoinHandle<String>, oneshot::Sender<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (go, went) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut request = Vec::new();
            let mut b = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&b[..n]);
            }
            // Writes fail once the other side has given up on the stream: that is its right.
            let _ = s.write_all(&head).await;
            if went.await.is_ok() {
                for p in rest {
                    let _ = s.write_all(&p).await;
                    let _ = s.flush().await;
                }
            }
            let _ = s.shutdown().await;
            while s.read(&mut b).await.is_ok_and(|n| n > 0) {}
            String::from_utf8_lossy(&request).into_owned()
        });
        (url, task, go)
    }

    /// Member 1 opens its message stream on a peer answering `pieces`; the raft side's reads
    /// until the stream ends: the messages stepped and why it ended.
    async fn read_stream(head: Vec<u8>, rest: Vec<Vec<u8>>) -> (String, Result<(Vec<Message>, String), OpenError>) {
        let dir = tempfile::tempdir().unwrap();
        let (url, peer, go) = peer(head, rest).await;
        let (_h, mut t) = with_peer(true, dir.path(), &url);
        let mut poll = mio::Poll::new().unwrap();
        t.attach(poll.registry());
        let shared = t.shared().clone();
        // A link of its own: the transport's would open its streams on the peer too.
        let (link, _pipeline) = crate::rafthttp::transport::Link::new(2);
        let opened = open(&shared, &link, StreamKind::Message, &url).await;
        let mut ended = match opened {
            Ok(Some(e)) => e,
            Ok(None) => panic!("a plain TCP stream must be read by the raft thread"),
            Err(e) => {
                drop(go);
                return (peer.await.unwrap(), Err(e));
            }
        };
        let _ = go.send(());
        let raft_side = tokio::task::spawn_blocking(move || {
            let mut events = mio::Events::with_capacity(8);
            let mut stepped = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
                let ready: Vec<mio::Token> = events.iter().map(|e| e.token()).collect();
                t.receive(&ready, &mut stepped);
                if let Ok(why) = ended.try_recv() {
                    return (stepped, why);
                }
                assert!(Instant::now() < deadline, "the stream never ended; stepped {stepped:?}");
            }
        });
        let got = raft_side.await.unwrap();
        (peer.await.unwrap(), Ok(got))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_read_on_the_raft_thread_steps_every_message_in_order_until_it_ends() {
        let (m1, m2, m3) = (heartbeat(1), heartbeat(2), heartbeat(3));
        let mut link_heartbeat = Message::default();
        link_heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        let mut head = b"HTTP/1.1 200 OK\r\nX-Server-Version: 3.6.16\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        head.extend(chunk(&frames(std::slice::from_ref(&m1))));
        let second = chunk(&frames(&[m2.clone(), link_heartbeat, m3.clone()]));
        let (a, b) = second.split_at(7);
        let (request, got) = read_stream(head, vec![a.to_vec(), b.to_vec(), b"0\r\n\r\n".to_vec()]).await;
        assert!(request.starts_with("GET /raft/stream/message/1 HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("X-Etcd-Cluster-ID: c1\r\n") && request.contains("X-Raft-To: 2\r\n"), "{request}");
        let (stepped, why) = got.unwrap();
        assert_eq!(stepped, vec![m1, m2, m3], "the link heartbeat is not raft's");
        assert_eq!(why, "EOF");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_on_a_stream_ends_it_and_steps_nothing_more() {
        let m1 = heartbeat(1);
        let mut body = frames(std::slice::from_ref(&m1));
        body.extend_from_slice(&5u64.to_be_bytes());
        body.extend_from_slice(&[0xff; 5]);
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let (_, got) = read_stream(head, vec![chunk(&body), chunk(&frames(&[heartbeat(2)]))]).await;
        let (stepped, why) = got.unwrap();
        assert_eq!(stepped, vec![m1]);
        assert!(why.starts_with("rafthttp:"), "{why}");
        // A bad chunk size is as bad.
        let (_, got) = read_stream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), vec![b"xyz\r\n".to_vec()]).await;
        let (stepped, why) = got.unwrap();
        assert!(stepped.is_empty() && why.contains("malformed chunk size"), "{why}");
        // With the head, it refuses the stream.
        let (_, got) = read_stream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n".to_vec(), vec![]).await;
        assert!(matches!(&got, Err(OpenError::Other(e)) if e.contains("malformed chunk size")), "{got:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_are_etcds() {
        let (_, got) =
            read_stream(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 20\r\n\r\ncluster ID mismatch\n".to_vec(), vec![]).await;
        assert!(matches!(got, Err(OpenError::ClusterIdMismatch)), "{got:?}");
        let (_, got) =
            read_stream(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 21\r\n\r\nincompatible version\n".to_vec(), vec![]).await;
        assert!(matches!(got, Err(OpenError::IncompatibleVersion)), "{got:?}");
        let (_, got) = read_stream(b"HTTP/1.1 410 Gone\r\nContent-Length: 15\r\n\r\nremoved member\n".to_vec(), vec![]).await;
        assert!(matches!(got, Err(OpenError::Removed)), "{got:?}");
        let (_, got) = read_stream(b"not http at all\r\n\r\n".to_vec(), vec![]).await;
        assert!(matches!(&got, Err(OpenError::Other(e)) if e.contains("malformed HTTP answer")), "{got:?}");
    }

    fn dechunk_in_pieces(wire: &[u8], piece: usize) -> (Vec<u8>, bool) {
        let mut d = Dechunker::default();
        let mut out = BytesMut::new();
        let mut ended = false;
        for p in wire.chunks(piece) {
            ended = d.feed(p, &mut out).unwrap();
        }
        (out.to_vec(), ended)
    }

    #[test]
    fn chunked_bodies_come_out_whole_however_the_bytes_arrive() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nb\r\nworld-again\r\n0\r\nX-Trailer: 1\r\n\r\nignored";
        for piece in 1..wire.len() {
            let (body, ended) = dechunk_in_pieces(wire, piece);
            assert_eq!(body, b"hello world-again", "piece {piece}");
            assert!(ended, "piece {piece}");
        }
        let (body, ended) = dechunk_in_pieces(b"3\r\nabc\r\n4\r\nde", 2);
        assert_eq!((body, ended), (b"abcde".to_vec(), false));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", &[b'1'; 5000][..]] {
            let mut out = BytesMut::new();
            assert!(Dechunker::default().feed(wire, &mut out).is_err(), "{:?}", String::from_utf8_lossy(&wire[..wire.len().min(20)]));
        }
    }
}

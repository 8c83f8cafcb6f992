//! Snapshots between members, as etcd sends them: `POST /raft/snapshot`, the body the raft
//! snapshot message (its size as 8 bytes big-endian, then the protobuf) followed by the
//! leader's backend as an etcd backend (bbolt). An etcd follower opens what a Keel leader
//! sends, and a Keel follower installs what an etcd leader sends. Between Keel members the
//! backend travels as its records instead ([`records`]: `POST /raft/keel/snapshot`), read from
//! one consistent view as they are sent and loaded as they arrive.
//!
//! - [`send`]: asks the peer whether it takes Keel's records; if so streams them, else writes
//!   the backend as a bbolt file beside the snap directory and streams that; tells raft how it
//!   went (raft holds the follower until then).
//! - [`receive`] (etcd's body) and [`receive_records`] (Keel's): read the message, make the
//!   backend in the snap directory (bounded by twice the backend quota) as a Keel backend, and
//!   hand both to raft; nothing of a failed or refused transfer stays on disk.
//!
//! Owns the staged files (removed through `keel_reclaim`). Calls [`BackendFiles`] for the
//! conversions and the backend, the node, the dialer.

use crate::rafthttp::handshake::id_string;
use crate::rafthttp::pipeline::{check_post_answer, post_headers};
use crate::rafthttp::records::{self, Decoder, Encoder};
use crate::rafthttp::transport::{Link, Shared};
use anyhow::{anyhow, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use http_body_util::BodyExt;
use keel_raft::eraftpb::{Message, MessageType};
use keel_raft::ProtoMessage;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest snapshot message read before the backend (etcd's `snapshotLimitByte`).
pub const MESSAGE_LIMIT: u64 = 64 << 20;
/// Bytes of the backend file per chunk sent.
const CHUNK: usize = 1 << 20;

/// How a member's backend goes into a snapshot and comes out of one: etcd's backend format
/// (bbolt) on the wire, whatever the member keeps on disk.
pub trait BackendFiles: Send + Sync + 'static {
    /// Writes this member's committed backend as an etcd backend into `out`, synced. Runs on a
    /// blocking thread.
    fn export(&self, out: std::fs::File) -> Result<()>;
    /// Turns the etcd backend at `bolt` into this member's backend at `dest` (which does not
    /// exist yet), durably. Runs on a blocking thread.
    fn import(&self, bolt: &Path, dest: &Path) -> Result<()>;
    /// Commits what the store holds and gives its backend, whose committed state a snapshot
    /// for a Keel peer is read from. Runs on a blocking thread.
    fn backend(&self) -> Result<keel_mvcc::backend::Backend>;
}

/// A file removed when dropped, however the transfer ends.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        // A backend's worth of bytes: given back in steps (keel_reclaim).
        let _ = keel_reclaim::remove(&self.0);
    }
}

/// Sends snapshot message `m` with this member's backend to `link`'s peer and reports the
/// outcome to raft.
pub(crate) async fn send(shared: Arc<Shared>, link: Arc<Link>, m: Message) {
    let index = m.get_snapshot().get_metadata().index;
    let t0 = Instant::now();
    let metrics = &keel_metrics::METRICS;
    let ok = match send_to(&shared, &link, &m).await {
        Ok(bytes) => {
            tracing::info!(
                remote_peer_id = %link.label,
                snapshot_index = index,
                bytes,
                took = ?t0.elapsed(),
                "sent database snapshot to remote peer"
            );
            metrics.snapshot_send_success.with_label_values(&[&link.label]).inc();
            true
        }
        Err(e) => {
            tracing::warn!(remote_peer_id = %link.label, snapshot_index = index, error = format!("{e:#}"), "failed to send database snapshot");
            metrics.snapshot_send_failures.with_label_values(&[&link.label]).inc();
            false
        }
    };
    if let Some(n) = shared.node() {
        if !ok {
            n.report_unreachable(link.id);
        }
        n.report_snapshot(link.id, ok);
    }
}

/// How long a peer has to answer whether it takes Keel's records.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Chunks of encoded records between the thread reading the backend and the connection.
const RECORD_CHUNKS: usize = 4;

/// The message's framing ahead of the backend: its size as 8 bytes big-endian, the protobuf.
fn message_head(m: &Message) -> Result<Bytes> {
    let msg = m.write_to_bytes().map_err(|e| anyhow!("encode the snapshot message: {e}"))?;
    let mut head = BytesMut::with_capacity(8 + msg.len());
    head.extend_from_slice(&(msg.len() as u64).to_be_bytes());
    head.extend_from_slice(&msg);
    Ok(head.freeze())
}

async fn send_to(shared: &Shared, link: &Link, m: &Message) -> Result<u64> {
    let url = shared.peer_urls(link.id).into_iter().next().ok_or_else(|| anyhow!("member {} has no peer URL", link.label))?;
    // An etcd member answers 404 (and a Keel member that could not be asked gets etcd's body,
    // which every member takes).
    let native = match crate::rafthttp::client::get(&shared.dialer, &url, records::FORMAT_PATH, ASK_TIMEOUT).await {
        Ok(a) => a.status == http::StatusCode::OK && a.body.as_ref() == records::FORMAT.as_bytes(),
        Err(e) => {
            tracing::debug!(remote_peer_id = %link.label, error = format!("{e:#}"), "cannot ask the peer for its snapshot formats");
            false
        }
    };
    let format = if native { "keel" } else { "etcd" };
    keel_metrics::METRICS.snapshot_send_format.with_label_values(&[&link.label, format]).inc();
    if native {
        send_records(shared, link, m, &url).await
    } else {
        send_bbolt(shared, link, m, &url).await
    }
}

/// Posts `body` (`total` bytes, when known) to `path` on the peer at `url`, and reads the answer.
async fn post_snapshot<B>(shared: &Shared, link: &Link, url: &str, path: &str, body: B, total: u64) -> Result<()>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (io, host) = shared.dialer.connect_io(url).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::post(path).header(http::header::HOST, host);
    for (name, value) in post_headers(shared, "application/octet-stream") {
        req = req.header(name, value);
    }
    let req = req.body(body)?;
    // A deadline that a live transfer meets: a minute, and a second per 4 MB.
    let deadline = Duration::from_secs(60 + total / (4 << 20));
    let resp = tokio::time::timeout(deadline, sender.send_request(req)).await.map_err(|_| anyhow!("timed out"))??;
    let status = resp.status().as_u16();
    let answer = tokio::time::timeout(Duration::from_secs(5), http_body_util::Limited::new(resp.into_body(), 1 << 20).collect())
        .await
        .map_err(|_| anyhow!("timed out reading the answer"))?
        .map_err(|e| anyhow!("reading the answer: {e}"))?
        .to_bytes();
    check_post_answer(status, &answer, link.id)
}

/// Streams the backend's records, read from one consistent view on a background thread while
/// the connection takes them (a few chunks in memory).
async fn send_records(shared: &Shared, link: &Link, m: &Message, url: &str) -> Result<u64> {
    let head = message_head(m)?;
    let files = shared.files.clone();
    let backend = crate::background::run("snapshot-backend", move || files.backend())
        .await
        .map_err(|e| anyhow!("backend task: {e}"))?
        .context("the backend for a snapshot")?;
    // The deadline's estimate: the file holds the records and their index.
    let estimate = backend.size();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(RECORD_CHUNKS);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(head.len() as u64));
    let counted = sent.clone();
    let _ = tx.send(Ok(head)).await;
    let reader = crate::background::run("snapshot-records", move || {
        let mut enc = Encoder::default();
        let mut chunk = BytesMut::with_capacity(CHUNK + 4096);
        let mut closed = false;
        let meta = backend.dump(|table, k, v| {
            enc.record(&mut chunk, table, k, v);
            if chunk.len() >= CHUNK {
                let full = std::mem::replace(&mut chunk, BytesMut::with_capacity(CHUNK + 4096)).freeze();
                counted.fetch_add(full.len() as u64, std::sync::atomic::Ordering::Relaxed);
                // The connection went away: stop reading.
                closed = tx.blocking_send(Ok(full)).is_err();
            }
            !closed
        });
        match meta {
            Ok(meta) => {
                enc.end(&mut chunk, &meta);
                counted.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let _ = tx.blocking_send(Ok(chunk.freeze()));
            }
            Err(e) => {
                // The peer sees a body cut short and refuses it.
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let body = http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|r: std::io::Result<Bytes>| r.map(Frame::data)),
    );
    // The reader ends once the body is gone (sent or dropped).
    let (posted, read) = tokio::join!(post_snapshot(shared, link, url, records::FORMAT_PATH, body, estimate), reader);
    read.map_err(|e| anyhow!("records task: {e}"))?;
    posted?;
    let total = sent.load(std::sync::atomic::Ordering::Relaxed);
    link.sent_bytes.inc_by(total);
    Ok(total)
}

/// Writes the backend as an etcd backend file, then streams it.
async fn send_bbolt(shared: &Shared, link: &Link, m: &Message, url: &str) -> Result<u64> {
    let index = m.get_snapshot().get_metadata().index;
    let path = shared.snap_dir.join(format!("{index:016x}.snap.db.to-{}.tmp", link.label));
    let staged = Staged(path.clone());
    let files = shared.files.clone();
    let p = path.clone();
    crate::background::run("snapshot-export", move || {
        files.export(std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?)
    })
    .await
    .map_err(|e| anyhow!("export task: {e}"))?
    .context("write the backend for a snapshot")?;
    let file = tokio::fs::File::open(&path).await.with_context(|| format!("open {}", path.display()))?;
    let size = file.metadata().await?.len();
    let head = message_head(m)?;
    let total = head.len() as u64 + size;
    let body =
        http_body_util::StreamBody::new(futures::stream::unfold((Some(head), file, staged), |(head, mut file, staged)| async move {
            if let Some(h) = head {
                return Some((Ok(Frame::data(h)), (None, file, staged)));
            }
            let mut buf = BytesMut::with_capacity(CHUNK);
            match file.read_buf(&mut buf).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(Frame::data(buf.freeze())), (None, file, staged))),
                Err(e) => Some((Err(e), (None, file, staged))),
            }
        }));
    post_snapshot(shared, link, url, "/raft/snapshot", body, total).await?;
    link.sent_bytes.inc_by(total);
    Ok(total)
}

/// Why a received snapshot was refused: etcd's HTTP status and text.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub text: String,
}

fn refused(status: u16, text: impl Into<String>) -> Refused {
    Refused { status, text: text.into() }
}

/// Reads the snapshot message at the front of a snapshot request's body: its size, then the
/// protobuf. Returns it and the bytes read after it, and logs the reception's start.
async fn read_message<B>(body: &mut B) -> Result<(Message, BytesMut), Refused>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    let m = loop {
        if buf.len() >= 8 {
            let n = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
            if n > MESSAGE_LIMIT {
                return Err(refused(400, "failed to decode raft message (rafthttp: error limit exceeded)"));
            }
            if buf.len() as u64 >= 8 + n {
                buf.advance(8);
                let b = buf.split_to(n as usize);
                break keel_raft::wire::message(&b).map_err(|e| refused(400, format!("failed to decode raft message ({e})")))?;
            }
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => return Err(refused(400, format!("failed to decode raft message ({e})"))),
            None => return Err(refused(400, "failed to decode raft message (unexpected EOF)")),
        }
    };
    if m.get_msg_type() != MessageType::MsgSnapshot {
        tracing::warn!(remote_snapshot_sender_id = %id_string(m.from), message_type = ?m.get_msg_type(), "unexpected Raft message type");
        return Err(refused(400, "wrong raft message type"));
    }
    let index = m.get_snapshot().get_metadata().index;
    tracing::info!(remote_snapshot_sender_id = %id_string(m.from), incoming_snapshot_index = index, "receiving database snapshot");
    Ok((m, buf))
}

/// The refusal of a snapshot over `limit` bytes (twice the backend quota).
fn over_limit(index: u64, received: u64, limit: u64) -> Refused {
    tracing::warn!(index, received, limit, "refused a snapshot larger than twice the backend quota");
    refused(500, format!("failed to save KV snapshot (snapshot larger than {limit} bytes (twice --quota-backend-bytes))"))
}

/// Puts the received backend `tmp` in place as the snapshot's backend and hands both to raft.
fn install(shared: &Shared, m: Message, staged_tmp: Staged, received: u64, t0: Instant) -> Result<(), Refused> {
    let index = m.get_snapshot().get_metadata().index;
    let fin = shared.snap_dir.join(format!("{index:016x}.snap.db"));
    std::fs::rename(&staged_tmp.0, &fin).map_err(|e| refused(500, format!("failed to save KV snapshot ({e})")))?;
    std::mem::forget(staged_tmp);
    keel_metrics::METRICS.snap_db_save.observe(t0.elapsed().as_secs_f64());
    tracing::info!(
        remote_snapshot_sender_id = %id_string(m.from),
        incoming_snapshot_index = index,
        incoming_snapshot_size_bytes = received,
        download_took = ?t0.elapsed(),
        "received and saved database snapshot"
    );
    let node = shared.node().ok_or_else(|| refused(500, "failed to process raft message (not started)"))?;
    node.install_snapshot(m, fin).map_err(|e| refused(500, format!("failed to process raft message ({e:?})")))?;
    Ok(())
}

/// A staged file of one reception: `<index>.snap.<what>.<n>.tmp`, `n` unique in the process, so
/// that a reception still running when the leader has given up on it and sent the snapshot again
/// never touches the new one's files (nor renames them into place half made). Leftovers of a
/// crash are removed at the next start (`Snapshotter::remove_partial_files`).
fn staged(shared: &Shared, index: u64, what: &str) -> Staged {
    static RECEPTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = RECEPTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Staged(shared.snap_dir.join(format!("{index:016x}.snap.{what}.{n}.tmp")))
}

/// The staged file the received backend is made in.
fn backend_tmp(shared: &Shared, index: u64) -> Staged {
    staged(shared, index, "db")
}

/// Records per batch a received Keel snapshot is loaded in, and their most bytes. Each batch is
/// synced ([`keel_mvcc::backend::Backend::load`]): on a disk shared with other members, the
/// leader's writes wait for one batch at most (100,000 x 16 KiB: the leader's p99 while sending
/// 4.0-25.3x its own before with 32 MiB batches synced only at the end, 2.7-2.9x with 4 MiB
/// batches each synced, the download 4-9% longer).
const LOAD_BATCH: usize = 10_000;
const LOAD_BATCH_BYTES: usize = 4 << 20;

/// Reads a Keel snapshot request's body (message, then the backend's [`records`]), loading the
/// records into a new backend as they arrive (a loader thread, two batches in flight), and
/// installs it through raft. `limit` bounds the bytes received (None: no bound).
pub(crate) async fn receive_records<B>(shared: &Shared, mut body: B, limit: Option<u64>) -> Result<(), Refused>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let t0 = Instant::now();
    let (m, mut buf) = read_message(&mut body).await?;
    let index = m.get_snapshot().get_metadata().index;
    let from = id_string(m.from);
    let save_failed = |e: String| refused(500, format!("failed to save KV snapshot ({e})"));
    let staged_tmp = backend_tmp(shared, index);
    let tmp = staged_tmp.0.clone();
    type Batch = (Vec<(u32, Vec<u8>, Vec<u8>)>, Option<keel_mvcc::backend::Meta>);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(2);
    let loader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let out = keel_mvcc::backend::Backend::open(&tmp).map_err(|e| e.to_string())?;
        while let Some((batch, meta)) = rx.blocking_recv() {
            out.load(&batch, meta.as_ref()).map_err(|e| e.to_string())?;
            if meta.is_some() {
                return Ok(());
            }
        }
        Err("the snapshot ended early".into())
    });
    let mut dec = Decoder::default();
    let mut received = buf.len() as u64;
    let mut batch = Vec::with_capacity(LOAD_BATCH);
    let mut bytes = 0usize;
    let fed = async {
        loop {
            while let Some(frame) = dec.next(&mut buf).map_err(|e| save_failed(format!("malformed snapshot: {e}")))? {
                match frame {
                    records::Frame::Record(table, k, v) => {
                        bytes += k.len() + v.len();
                        batch.push((table, k, v));
                        if batch.len() >= LOAD_BATCH || bytes >= LOAD_BATCH_BYTES {
                            bytes = 0;
                            let full = std::mem::replace(&mut batch, Vec::with_capacity(LOAD_BATCH));
                            // A loader that stopped says why below.
                            if tx.send((full, None)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    records::Frame::End(meta) => {
                        let _ = tx.send((std::mem::take(&mut batch), Some(meta))).await;
                    }
                }
            }
            match body.frame().await {
                None if dec.ended() => return Ok(()),
                None => return Err(save_failed("the snapshot ended early (unexpected EOF)".into())),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        received += d.len() as u64;
                        if let Some(limit) = limit.filter(|l| received > *l) {
                            return Err(over_limit(index, received, limit));
                        }
                        buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => return Err(save_failed(e.to_string())),
            }
        }
    }
    .await;
    // The loader ends with the last batch, or when its channel closes here.
    drop(tx);
    let loaded = loader.await.map_err(|e| save_failed(e.to_string()))?;
    fed?;
    loaded.map_err(save_failed)?;
    keel_metrics::METRICS.peer_received_bytes.with_label_values(&[&from]).inc_by(received);
    install(shared, m, staged_tmp, received, t0)
}

/// Reads an etcd snapshot request's body (message, then backend), installs it through raft.
/// `limit` bounds the backend's size (None: no bound).
pub(crate) async fn receive<B>(shared: &Shared, mut body: B, limit: Option<u64>) -> Result<(), Refused>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let t0 = Instant::now();
    let metrics = &keel_metrics::METRICS;
    let (m, buf) = read_message(&mut body).await?;
    let from = id_string(m.from);
    let index = m.get_snapshot().get_metadata().index;
    let staged = staged(shared, index, "bolt");
    let bolt = staged.0.clone();
    let save_failed = |e: String| refused(500, format!("failed to save KV snapshot ({e})"));
    let mut file = tokio::fs::File::create(&bolt).await.map_err(|e| save_failed(e.to_string()))?;
    let mut received = 0u64;
    let mut next: Bytes = buf.freeze();
    loop {
        received += next.len() as u64;
        if let Some(limit) = limit.filter(|l| received > *l) {
            return Err(over_limit(index, received, limit));
        }
        file.write_all(&next).await.map_err(|e| save_failed(e.to_string()))?;
        next = match body.frame().await {
            None => break,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => Bytes::new(),
            },
            Some(Err(e)) => return Err(save_failed(e.to_string())),
        };
    }
    // Not synced: the received file is only the import's input, removed after it; what must be
    // durable is the imported backend, which the import makes so.
    file.flush().await.map_err(|e| save_failed(e.to_string()))?;
    drop(file);
    metrics.peer_received_bytes.with_label_values(&[&from]).inc_by(received);
    // The received backend as this member keeps it, then in place under its final name.
    let staged_tmp = backend_tmp(shared, index);
    let files = shared.files.clone();
    let (b, t) = (bolt.clone(), staged_tmp.0.clone());
    tokio::task::spawn_blocking(move || files.import(&b, &t))
        .await
        .map_err(|e| save_failed(e.to_string()))?
        .map_err(|e| save_failed(format!("{e:#}")))?;
    drop(staged);
    install(shared, m, staged_tmp, received, t0)
}

//! Snapshots between members, as etcd sends them: `POST /raft/snapshot`, the body the raft
//! snapshot message (its size as 8 bytes big-endian, then the protobuf) followed by the
//! leader's backend as an etcd backend (bbolt). An etcd follower opens what a Keel leader
//! sends, and a Keel follower installs what an etcd leader sends.
//!
//! - [`send`]: writes the backend as a bbolt file beside the snap directory, streams it, and
//!   tells raft how it went (raft holds the follower until then).
//! - [`receive`]: reads the message, saves the backend into the snap directory (bounded by
//!   twice the backend quota), turns it into a Keel backend, and hands both to raft; nothing of
//!   a failed or refused transfer stays on disk.
//!
//! Owns the staged files. Calls [`BackendFiles`] for the conversions, the node, the dialer.

use crate::rafthttp::handshake::id_string;
use crate::rafthttp::pipeline::{check_post_answer, post_headers};
use crate::rafthttp::transport::{Link, Shared};
use anyhow::{anyhow, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
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
}

/// A file removed when dropped, however the transfer ends.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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

async fn send_to(shared: &Shared, link: &Link, m: &Message) -> Result<u64> {
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
    let msg = m.write_to_bytes().map_err(|e| anyhow!("encode the snapshot message: {e}"))?;
    let mut head = BytesMut::with_capacity(8 + msg.len());
    head.extend_from_slice(&(msg.len() as u64).to_be_bytes());
    head.extend_from_slice(&msg);
    let head = head.freeze();
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
    let url = shared.peer_urls(link.id).into_iter().next().ok_or_else(|| anyhow!("member {} has no peer URL", link.label))?;
    let (io, host) = shared.dialer.connect_io(&url).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::post("/raft/snapshot").header(http::header::HOST, host);
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
    link.sent_bytes.inc_by(total);
    check_post_answer(status, &answer, link.id)?;
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

/// Reads a snapshot request's body (message, then backend), installs it through raft. `limit`
/// bounds the backend's size (None: no bound).
pub(crate) async fn receive<B>(shared: &Shared, mut body: B, limit: Option<u64>) -> Result<(), Refused>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let t0 = Instant::now();
    let metrics = &keel_metrics::METRICS;
    let mut buf = BytesMut::new();
    // The message: its size, then the protobuf.
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
    let from = id_string(m.from);
    if m.get_msg_type() != MessageType::MsgSnapshot {
        tracing::warn!(remote_snapshot_sender_id = %from, message_type = ?m.get_msg_type(), "unexpected Raft message type");
        return Err(refused(400, "wrong raft message type"));
    }
    let index = m.get_snapshot().get_metadata().index;
    tracing::info!(remote_snapshot_sender_id = %from, incoming_snapshot_index = index, "receiving database snapshot");
    let bolt = shared.snap_dir.join(format!("{index:016x}.snap.bolt.tmp"));
    let staged = Staged(bolt.clone());
    let save_failed = |e: String| refused(500, format!("failed to save KV snapshot ({e})"));
    let mut file = tokio::fs::File::create(&bolt).await.map_err(|e| save_failed(e.to_string()))?;
    let mut received = 0u64;
    let mut next: Bytes = buf.freeze();
    loop {
        received += next.len() as u64;
        if let Some(limit) = limit.filter(|l| received > *l) {
            tracing::warn!(index, received, limit, "refused a snapshot larger than twice the backend quota");
            return Err(save_failed(format!("snapshot larger than {limit} bytes (twice --quota-backend-bytes)")));
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
    let tmp = shared.snap_dir.join(format!("{index:016x}.snap.db.tmp"));
    let fin = shared.snap_dir.join(format!("{index:016x}.snap.db"));
    let _ = std::fs::remove_file(&tmp);
    let staged_tmp = Staged(tmp.clone());
    let files = shared.files.clone();
    let (b, t) = (bolt.clone(), tmp.clone());
    tokio::task::spawn_blocking(move || files.import(&b, &t))
        .await
        .map_err(|e| save_failed(e.to_string()))?
        .map_err(|e| save_failed(format!("{e:#}")))?;
    drop(staged);
    std::fs::rename(&tmp, &fin).map_err(|e| save_failed(e.to_string()))?;
    std::mem::forget(staged_tmp);
    metrics.snap_db_save.observe(t0.elapsed().as_secs_f64());
    tracing::info!(
        remote_snapshot_sender_id = %from,
        incoming_snapshot_index = index,
        incoming_snapshot_size_bytes = received,
        download_took = ?t0.elapsed(),
        "received and saved database snapshot"
    );
    let node = shared.node().ok_or_else(|| refused(500, "failed to process raft message (not started)"))?;
    node.install_snapshot(m, fin).map_err(|e| refused(500, format!("failed to process raft message ({e:?})")))?;
    Ok(())
}

//! etcd's pipeline: raft messages to a peer one `POST /raft` each (the body is the bare
//! protobuf), used when the peer holds no stream open to this member. [`WORKERS`] requests are
//! in flight at most (etcd's `connPerPipeline`), each on a kept connection.
//!
//! Owns the pipeline's queue readers. Calls the HTTP client pool, the node (unreachable) and the
//! link's metrics labels.

use crate::rafthttp::handshake::{self, id_string};
use crate::rafthttp::transport::{Link, Shared};
use keel_raft::eraftpb::Message;
use keel_raft::ProtoMessage;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Requests in flight to one peer (etcd's `connPerPipeline`).
pub const WORKERS: usize = 4;
/// A pipeline request's deadline.
const DEADLINE: Duration = Duration::from_secs(5);

/// Starts the workers draining `rx` to `link`'s peer; they end when the link is dropped.
pub(crate) fn start(shared: Arc<Shared>, link: Arc<Link>, rx: mpsc::Receiver<Message>) {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let link = Arc::downgrade(&link);
    for _ in 0..WORKERS {
        let (shared, rx, link) = (shared.clone(), rx.clone(), link.clone());
        shared.rt.clone().spawn(async move {
            let mut down = false;
            let mut url = 0;
            loop {
                let Some(m) = rx.lock().await.recv().await else { return };
                let Some(link) = link.upgrade() else { return };
                match post(&shared, &link, &m, url).await {
                    Ok(()) => down = false,
                    Err(e) => {
                        // The next message tries the peer's next URL (etcd's URL picker).
                        url = url.wrapping_add(1);
                        shared.unreachable(link.id);
                        keel_metrics::METRICS.peer_sent_failures.with_label_values(&[&link.label]).inc();
                        if !down {
                            down = true;
                            tracing::warn!(remote_peer_id = %link.label, error = %e, "failed to send out a message via pipeline");
                        }
                    }
                }
            }
        });
    }
}

/// Sends one message to the peer at its `url`th peer URL (modulo their number), once: a message
/// whose request failed may still have reached the peer, so it is never sent again (raft
/// resends what it needs; a proposal sent twice would be two entries). As etcd's pipeline.
async fn post(shared: &Shared, link: &Link, m: &Message, url: usize) -> anyhow::Result<()> {
    let body = m.write_to_bytes().map_err(|e| anyhow::anyhow!("encode: {e}"))?;
    let headers = post_headers(shared, "application/protobuf");
    let urls = shared.peer_urls(link.id);
    let Some(u) = urls.get(url % urls.len().max(1)) else { anyhow::bail!("no peer URL") };
    let len = body.len() as u64;
    let a = tokio::time::timeout(DEADLINE, shared.pool.post(u, "/raft", &headers, body.into()))
        .await
        .map_err(|_| anyhow::anyhow!("{u}/raft: timed out"))??;
    link.sent_bytes.inc_by(len);
    check_post_answer(a.status.as_u16(), &a.body, link.id)
}

/// The headers of a pipeline or snapshot request (etcd's `createPostRequest`).
pub(crate) fn post_headers(shared: &Shared, content_type: &str) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("Content-Type", content_type.to_string()),
        ("X-Server-From", id_string(shared.id)),
        ("X-Server-Version", handshake::SERVER_VERSION.to_string()),
        ("X-Min-Cluster-Version", handshake::MIN_CLUSTER_VERSION.to_string()),
        ("X-Etcd-Cluster-ID", id_string(shared.cluster_id)),
    ];
    if !shared.urls.is_empty() {
        h.push(("X-PeerURLs", shared.urls.join(",")));
    }
    h
}

/// etcd's reading of the answer to a pipeline or snapshot request (`checkPostResponse`).
pub(crate) fn check_post_answer(status: u16, body: &[u8], to: u64) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(body);
    match status {
        204 => Ok(()),
        412 => match text.trim_end_matches('\n') {
            "incompatible version" => {
                tracing::error!(remote_peer_id = %id_string(to), "request sent was ignored by peer");
                anyhow::bail!("incompatible version")
            }
            "cluster ID mismatch" => {
                tracing::error!(remote_peer_id = %id_string(to), "request sent was ignored due to cluster ID mismatch");
                anyhow::bail!("cluster ID mismatch")
            }
            other => anyhow::bail!("unhandled error {other:?} when precondition failed"),
        },
        403 => anyhow::bail!("the member has been permanently removed from the cluster"),
        other => anyhow::bail!("unexpected http status {other} while posting: {}", text.trim_end()),
    }
}

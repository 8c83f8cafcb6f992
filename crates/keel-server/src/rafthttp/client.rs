//! etcd's peer requests over HTTP/1.1, one connection per request (as etcd's peer client
//! does for `/members` and `/version`): a bounded body, a deadline for the whole exchange; and
//! the member list a joining member reads with them ([`fetch_members`]).

use crate::peer::Dialer;
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use keel_proto::keelpb::SnapshotData;
use std::time::Duration;

/// The largest answer body read (a member list of hundreds of members fits many times over).
const MAX_BODY: usize = 4 << 20;

/// An answer: status, headers and the whole body.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// `GET <base><path>` on the peer at `base` (a peer URL), within `timeout`.
pub async fn get(dialer: &Dialer, base: &str, path: &str, timeout: Duration) -> Result<Answer> {
    tokio::time::timeout(timeout, exchange(dialer, base, path)).await.map_err(|_| anyhow!("{base}{path}: timed out"))?
}

async fn exchange(dialer: &Dialer, base: &str, path: &str) -> Result<Answer> {
    let (io, host) = dialer.connect_io(base).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(path).header(http::header::HOST, host).body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await;
    let out = async {
        let resp = resp?;
        let (parts, body) = resp.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => bail!("{base}{path}: reading the answer: {e}"),
        };
        Ok(Answer { status: parts.status, headers: parts.headers, body })
    }
    .await;
    driver.abort();
    out
}

/// Asks the members at `urls` for the cluster's member list (for joining an existing cluster),
/// as etcd does: `GET <peer URL>/members`, the cluster ID in `X-Etcd-Cluster-ID`. Answered alike
/// by etcd and Keel members.
pub async fn fetch_members(dialer: &Dialer, urls: &[String]) -> Result<SnapshotData> {
    let mut last = anyhow!("no peer URL to ask");
    for _ in 0..30 {
        for u in urls {
            match members_of(dialer, u).await {
                Ok(d) => return Ok(d),
                Err(e) => {
                    tracing::warn!(address = %format!("{u}/members"), error = %e, "failed to get cluster response");
                    last = e;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.context("cannot fetch the cluster's members from its peers"))
}

async fn members_of(dialer: &Dialer, url: &str) -> Result<SnapshotData> {
    let a = get(dialer, url.trim_end_matches('/'), "/members", Duration::from_secs(2)).await?;
    let list: Vec<crate::membership::MemberJson> =
        serde_json::from_slice(&a.body).map_err(|e| anyhow!("{url}/members: not a member list ({}): {e}", a.status))?;
    let id = a.headers.get("X-Etcd-Cluster-ID").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let cluster_id = u64::from_str_radix(id, 16).map_err(|_| anyhow!("{url}/members: bad cluster ID header {id:?}"))?;
    if list.is_empty() {
        return Err(anyhow!("failed to get raft cluster member(s) from the given URLs"));
    }
    Ok(SnapshotData { cluster_id, members: list.into_iter().map(Into::into).collect() })
}

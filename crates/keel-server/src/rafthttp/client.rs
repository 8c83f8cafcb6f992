//! etcd's peer requests over HTTP/1.1, one connection per request (as etcd's peer client
//! does for `/members` and `/version`): a bounded body, a deadline for the whole exchange.

use crate::peer::Dialer;
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
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

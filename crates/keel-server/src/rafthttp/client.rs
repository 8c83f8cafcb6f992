//! etcd's peer requests over HTTP/1.1: one connection per request (as etcd's peer client
//! does for `/members` and `/version`), or kept connections ([`Pool`]) for the requests a
//! member sends all the time (the pipeline, probes, lease forwarding); a bounded answer body, a
//! deadline for the whole exchange; and the member list a joining member reads
//! ([`fetch_members`]).

use crate::peer::Dialer;
use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use keel_proto::keelpb::SnapshotData;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Duration;

/// The largest answer body read (a member list of hundreds of members fits many times over;
/// etcd bounds lease answers at 100 MB, a lease with every key of a large store).
const MAX_BODY: usize = 100 << 20;
/// Idle connections kept per peer URL.
const IDLE_PER_URL: usize = 8;

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
    Ok(SnapshotData { cluster_id, members: list.into_iter().map(Into::into).collect(), removed: vec![] })
}

/// Kept HTTP/1.1 connections to peers, by peer URL: a request takes an idle one or dials, and
/// gives it back once its answer is read.
pub struct Pool {
    dialer: Dialer,
    idle: Mutex<HashMap<String, Vec<Kept>>>,
}

struct Kept {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Pool {
    pub fn new(dialer: Dialer) -> Pool {
        Pool { dialer, idle: Mutex::new(HashMap::new()) }
    }

    /// `POST <base><path>` with `headers` and `body`.
    pub async fn post(&self, base: &str, path: &str, headers: &[(&str, String)], body: Bytes) -> Result<Answer> {
        self.exchange(http::Method::POST, base, path, headers, body).await
    }

    /// `GET <base><path>`.
    pub async fn get(&self, base: &str, path: &str) -> Result<Answer> {
        self.exchange(http::Method::GET, base, path, &[], Bytes::new()).await
    }

    /// `GET <base><path>` with `headers` and a body (etcd's `/members/hashkv` takes its request
    /// so).
    pub async fn get_with_body(&self, base: &str, path: &str, headers: &[(&str, String)], body: Bytes) -> Result<Answer> {
        self.exchange(http::Method::GET, base, path, headers, body).await
    }

    async fn exchange(&self, method: http::Method, base: &str, path: &str, headers: &[(&str, String)], body: Bytes) -> Result<Answer> {
        let base = base.trim_end_matches('/');
        let kept = self.take(base);
        let reused = kept.is_some();
        let mut k = match kept {
            Some(k) => k,
            None => self.connect(base).await?,
        };
        let mut sent = send(&mut k, method.clone(), path, headers, body.clone()).await;
        // A kept connection the peer closed meanwhile fails before the request is written: then
        // it goes once more on a new connection. A request that may have been written is never
        // sent again: the peer may have taken it (a raft proposal taken twice is two entries).
        if let Err(Failed { unsent: true, .. }) = sent {
            if reused {
                k = self.connect(base).await?;
                sent = send(&mut k, method, path, headers, body).await;
            }
        }
        let (parts, incoming) = sent.map_err(|f| f.error)?.into_parts();
        let body = match Limited::new(incoming, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => bail!("{base}{path}: reading the answer: {e}"),
        };
        if !k.sender.is_closed() {
            let mut idle = self.idle.lock();
            let list = idle.entry(base.to_string()).or_default();
            if list.len() < IDLE_PER_URL {
                list.push(k);
            }
        }
        Ok(Answer { status: parts.status, headers: parts.headers, body })
    }

    fn take(&self, base: &str) -> Option<Kept> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(base)?;
        while let Some(k) = list.pop() {
            if !k.sender.is_closed() {
                return Some(k);
            }
        }
        None
    }

    async fn connect(&self, base: &str) -> Result<Kept> {
        let (io, host) = self.dialer.connect_io(base).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Kept { sender, host })
    }
}

/// Why a request got no answer, and whether it certainly never left this member.
struct Failed {
    unsent: bool,
    error: anyhow::Error,
}

async fn send(
    k: &mut Kept,
    method: http::Method,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> std::result::Result<http::Response<hyper::body::Incoming>, Failed> {
    let unsent = |e: anyhow::Error| Failed { unsent: true, error: e };
    k.sender.ready().await.map_err(|e| unsent(e.into()))?;
    let mut req = http::Request::builder().method(method).uri(path).header(http::header::HOST, &k.host);
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req.body(Full::new(body)).map_err(|e| unsent(e.into()))?;
    k.sender.try_send_request(req).await.map_err(|mut e| {
        let unsent = e.take_message().is_some();
        Failed { unsent, error: e.into_error().into() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    /// Reads one HTTP/1.1 request (head and Content-Length body); false at the end of the stream.
    async fn read_request(r: &mut BufReader<tokio::net::TcpStream>) -> bool {
        let mut length = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return false;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        r.read_exact(&mut body).await.is_ok()
    }

    /// A request whose connection breaks after it was written is not sent again: the peer may
    /// have taken it. (Chaos found a proposal applied twice when the pool resent it.)
    #[tokio::test]
    async fn a_request_that_may_have_arrived_is_not_sent_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(conn);
                    while read_request(&mut r).await {
                        // The first request is answered; every later one is taken, then the
                        // connection breaks before the answer.
                        if counter.fetch_add(1, Ordering::SeqCst) > 0 {
                            return;
                        }
                        let _ = r.get_mut().write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                    }
                });
            }
        });
        let pool = Pool::new(Dialer::new(None, None));
        let a = pool.post(&base, "/raft", &[], Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(a.status, 204);
        // The second goes on the kept connection, which the peer breaks after taking it.
        assert!(pool.post(&base, "/raft", &[], Bytes::from_static(b"two")).await.is_err());
        assert_eq!(seen.load(Ordering::SeqCst), 2, "the second request was sent again");
    }
}

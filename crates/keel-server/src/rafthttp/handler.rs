//! What a member answers on its peer URLs for raft and leases, as etcd's peer handler does:
//! `POST /raft` (pipeline), `GET /raft/stream/{msgapp,message}/<id>` (streams), `POST
//! /raft/snapshot`, `/raft/probing`, and the lease requests followers forward to the leader
//! (`POST /leases`: keep-alive, `POST /leases/internal`: time to live). Statuses, texts and
//! headers are etcd's.
//!
//! Owns nothing; calls the transport's shared state (streams, node, snapshots) and the member's
//! lease answers through [`Forwarded`].

use crate::rafthttp::handshake::{self, accept_stream, id_string, Refusal, Sender};
use crate::rafthttp::stream::Outgoing;
use crate::rafthttp::transport::{Shared, Transport};
use crate::rafthttp::{records, snapshot};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use keel_proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse};
use prost::Message as _;
use std::sync::Arc;

/// The body of every answer.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Keep-alives forwarded to the leader.
pub const LEASE_PATH: &str = "/leases";
/// Time-to-live queries forwarded to the leader.
pub const LEASE_INTERNAL_PATH: &str = "/leases/internal";
/// etcd's answer when the leader's apply lags (`ErrLeaseHTTPTimeout`).
pub const LEASE_TIMEOUT: &str = "waiting for node to catch up its applied index has timed out";
/// The largest forwarded lease request (etcd's `maxLeaseHTTPRequestSize`).
const LEASE_REQUEST_LIMIT: usize = 64 * 1024;

/// etcd's `leasepb.LeaseInternalRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseInternalRequest {
    #[prost(message, optional, tag = "1")]
    pub request: Option<LeaseTimeToLiveRequest>,
}

/// etcd's `leasepb.LeaseInternalResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseInternalResponse {
    #[prost(message, optional, tag = "1")]
    pub response: Option<LeaseTimeToLiveResponse>,
}

/// The lease answers only a leader gives, which followers forward to it. The server implements
/// it; the transport knows nothing of the lessor.
pub trait Forwarded: Send + Sync + 'static {
    /// Renews lease `id`: its TTL, None when there is no such lease; Err when this member does
    /// not lead.
    fn lease_renew(&self, id: i64) -> futures::future::BoxFuture<'_, Result<Option<i64>, NotPrimary>>;
    /// A lease's remaining TTL, None when there is no such lease; Err when this member does not
    /// lead.
    fn lease_time_to_live(&self, r: &LeaseTimeToLiveRequest) -> Result<Option<LeaseTimeToLiveResponse>, NotPrimary>;
}

/// This member's lessor is not the primary one (it does not lead).
#[derive(Debug)]
pub struct NotPrimary;

/// The peer URLs' raft and lease endpoints of one member.
#[derive(Clone)]
pub struct Handler {
    shared: Arc<Shared>,
    forwarded: Arc<dyn Forwarded>,
    /// The most bytes of backend a received snapshot may hold (None: no bound).
    snapshot_limit: Option<u64>,
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Go's `http.Error`: the text and a newline, as plain text.
fn text(status: u16, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(405, "Method Not Allowed");
    r.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn header(req: &http::HeaderMap, name: &str) -> Option<String> {
    req.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// etcd's `checkClusterCompatibilityFromHeader`.
fn compatible(cluster: u64, h: &http::HeaderMap) -> Result<(), Refusal> {
    if !handshake::versions_compatible(header(h, "X-Server-Version").as_deref(), header(h, "X-Min-Cluster-Version").as_deref()) {
        tracing::warn!(
            remote_peer_server_version = ?header(h, "X-Server-Version"),
            remote_peer_server_minimum_cluster_version = ?header(h, "X-Min-Cluster-Version"),
            "failed to check version compatibility"
        );
        return Err(Refusal::INCOMPATIBLE_VERSION);
    }
    if header(h, "X-Etcd-Cluster-ID").as_deref() != Some(id_string(cluster).as_str()) {
        tracing::warn!(
            local_member_cluster_id = %id_string(cluster),
            remote_peer_cluster_id = ?header(h, "X-Etcd-Cluster-ID"),
            remote_peer_server_name = ?header(h, "X-Server-From"),
            "request cluster ID mismatch"
        );
        return Err(Refusal::CLUSTER_ID_MISMATCH);
    }
    Ok(())
}

impl Handler {
    pub fn new(transport: &Transport, forwarded: Arc<dyn Forwarded>, snapshot_limit: Option<u64>) -> Handler {
        Handler { shared: transport.shared().clone(), forwarded, snapshot_limit }
    }

    /// Offers a new plain-TCP connection to this member's peer listener for a stream this member
    /// writes itself ([`crate::rafthttp::direct`]): `Ok` when it was taken, else the connection
    /// and the bytes read from it, for the HTTP server to go on with.
    pub async fn offer_stream(&self, sock: tokio::net::TcpStream) -> Result<(), (tokio::net::TcpStream, Vec<u8>)> {
        crate::rafthttp::writer::offer(&self.shared, sock).await
    }

    /// Answers a request for a path under `/raft` or `/leases`.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/raft" => self.pipeline(req).await,
            "/raft/snapshot" => self.snapshot(req, false).await,
            records::FORMAT_PATH if req.method() == Method::GET => {
                let mut r = Response::new(full(records::FORMAT));
                r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                r
            }
            records::FORMAT_PATH => self.snapshot(req, true).await,
            crate::rafthttp::probe::PATH => {
                let mut r = Response::new(full(crate::rafthttp::probe::answer()));
                r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                r
            }
            LEASE_PATH | LEASE_INTERNAL_PATH => self.lease(req).await,
            p if p.starts_with("/raft/stream/") => self.stream(req),
            _ => text(404, "404 page not found"),
        }
    }

    fn with_cluster(&self, mut r: Response<Body>) -> Response<Body> {
        if let Ok(v) = HeaderValue::from_str(&id_string(self.shared.cluster_id)) {
            r.headers_mut().insert("X-Etcd-Cluster-ID", v);
        }
        r
    }

    fn stream<B>(&self, req: Request<B>) -> Response<Body> {
        let s = &self.shared;
        let h = req.headers();
        let decided = accept_stream(s.id, s.cluster_id, req.method().as_str(), req.uri().path(), |k| header(h, k), |id| s.sender(id));
        let mut r = match decided {
            Err(Refusal::METHOD) => return method_not_allowed("GET"),
            Err(refusal) => {
                if refusal == Refusal::UNKNOWN_SENDER {
                    tracing::warn!(path = req.uri().path(), "failed to find remote peer in cluster");
                } else if refusal == Refusal::TO_MISMATCH {
                    tracing::warn!(raft_to = ?header(h, "X-Raft-To"), "ignored streaming request; ID mismatch");
                }
                text(refusal.status, refusal.body)
            }
            Ok(a) => match Outgoing::attach(s, a.from, a.kind) {
                Some(body) => Response::new(body.boxed_unsync()),
                None => text(Refusal::UNKNOWN_SENDER.status, Refusal::UNKNOWN_SENDER.body),
            },
        };
        r.headers_mut().insert("X-Server-Version", HeaderValue::from_static(handshake::SERVER_VERSION));
        self.with_cluster(r)
    }

    async fn pipeline<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        if let Err(r) = compatible(self.shared.cluster_id, req.headers()) {
            return self.with_cluster(text(r.status, r.body));
        }
        let body = match Limited::new(req.into_body(), crate::rafthttp::codec::READ_LIMIT as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                tracing::warn!(error = %e, "failed to read Raft message");
                return self.with_cluster(text(400, "error reading raft message"));
            }
        };
        let m = match keel_raft::wire::message(&body) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "failed to unmarshal Raft message");
                return self.with_cluster(text(400, "error unmarshalling raft message"));
            }
        };
        keel_metrics::METRICS.peer_received_bytes.with_label_values(&[&id_string(m.from)]).inc_by(body.len() as u64);
        if self.shared.sender(m.from) == Sender::Removed {
            return self.with_cluster(text(403, "cannot process message from removed member"));
        }
        // A busy node drops the message, as a full receive buffer does in etcd: raft resends.
        if let Some(n) = self.shared.node() {
            let _ = n.step(m);
        }
        self.with_cluster(empty(StatusCode::NO_CONTENT))
    }

    /// A snapshot sent with etcd's body, or with Keel's records when `records`.
    async fn snapshot<B>(&self, req: Request<B>, records: bool) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display,
    {
        let metrics = &keel_metrics::METRICS;
        if req.method() != Method::POST {
            metrics.snapshot_receive_failures.with_label_values(&["UNKNOWN_SNAPSHOT_SENDER"]).inc();
            return method_not_allowed("POST");
        }
        if let Err(r) = compatible(self.shared.cluster_id, req.headers()) {
            metrics.snapshot_receive_failures.with_label_values(&["UNKNOWN_SNAPSHOT_SENDER"]).inc();
            return self.with_cluster(text(r.status, r.body));
        }
        let from = header(req.headers(), "X-Server-From").unwrap_or_default();
        let received = if records {
            snapshot::receive_records(&self.shared, req.into_body(), self.snapshot_limit).await
        } else {
            snapshot::receive(&self.shared, req.into_body(), self.snapshot_limit).await
        };
        match received {
            Ok(()) => {
                metrics.snapshot_receive_success.with_label_values(&[&from]).inc();
                self.with_cluster(empty(StatusCode::NO_CONTENT))
            }
            Err(r) => {
                tracing::warn!(remote_snapshot_sender_id = %from, status = r.status, error = %r.text, "failed to receive a database snapshot");
                metrics.snapshot_receive_failures.with_label_values(&[&from]).inc();
                self.with_cluster(text(r.status, &r.text))
            }
        }
    }

    async fn lease<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.method() != Method::POST {
            return text(405, "Method Not Allowed");
        }
        let internal = req.uri().path() == LEASE_INTERNAL_PATH;
        let body = match Limited::new(req.into_body(), LEASE_REQUEST_LIMIT).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return text(413, "request body too large"),
            Err(_) => return text(400, "error reading body"),
        };
        let answer = if internal {
            let Ok(r) = LeaseInternalRequest::decode(body.as_ref()) else { return text(400, "error unmarshalling request") };
            let r = r.request.unwrap_or_default();
            match self.forwarded.lease_time_to_live(&r) {
                Ok(Some(resp)) => LeaseInternalResponse { response: Some(resp) }.encode_to_vec(),
                Ok(None) => return text(404, "lease not found"),
                Err(NotPrimary) => return text(500, "not a primary lessor"),
            }
        } else {
            let Ok(r) = LeaseKeepAliveRequest::decode(body.as_ref()) else { return text(400, "error unmarshalling request") };
            match self.forwarded.lease_renew(r.id).await {
                Ok(Some(ttl)) => keel_proto::etcdserverpb::LeaseKeepAliveResponse { header: None, id: r.id, ttl }.encode_to_vec(),
                Ok(None) => return text(404, "lease not found"),
                Err(NotPrimary) => return text(400, "not a primary lessor"),
            }
        };
        let mut r = Response::new(full(answer));
        r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/protobuf"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_raft::eraftpb::{Message, MessageType};
    use keel_raft::ProtoMessage;

    use crate::rafthttp::testing::{with_transport, CLUSTER};

    fn handler(leading: bool, dir: &std::path::Path) -> Handler {
        with_transport(leading, dir).0
    }

    fn request(method: &str, path: &str, headers: &[(&str, String)], body: Vec<u8>) -> Request<Full<Bytes>> {
        let mut r = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.body(Full::new(Bytes::from(body))).unwrap()
    }

    use crate::rafthttp::testing::peer_headers;

    async fn answer(r: Response<Body>) -> (u16, http::HeaderMap, Vec<u8>) {
        let (parts, body) = r.into_parts();
        (parts.status.as_u16(), parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
    }

    #[tokio::test]
    async fn the_pipeline_refuses_as_etcd_does() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(true, dir.path());
        let (status, headers, body) = answer(h.handle(request("GET", "/raft", &peer_headers(CLUSTER), vec![])).await).await;
        assert_eq!((status, headers["Allow"].to_str().unwrap(), &body[..]), (405, "POST", &b"Method Not Allowed\n"[..]));
        let (status, headers, body) = answer(h.handle(request("POST", "/raft", &peer_headers(0xc2), vec![])).await).await;
        assert_eq!((status, &body[..]), (412, &b"cluster ID mismatch\n"[..]));
        assert_eq!(headers["X-Etcd-Cluster-ID"], "c1");
        let mut old = peer_headers(CLUSTER);
        old[1].1 = "2.3.8".into();
        let (status, _, body) = answer(h.handle(request("POST", "/raft", &old, vec![])).await).await;
        assert_eq!((status, &body[..]), (412, &b"incompatible version\n"[..]));
        let (status, _, body) = answer(h.handle(request("POST", "/raft", &peer_headers(CLUSTER), vec![0xff, 0xff, 0xff])).await).await;
        assert_eq!((status, &body[..]), (400, &b"error unmarshalling raft message\n"[..]));
        // A message is taken (no node yet: dropped, as a busy node drops it).
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        (m.from, m.to, m.term) = (2, 1, 5);
        let (status, _, _) = answer(h.handle(request("POST", "/raft", &peer_headers(CLUSTER), m.write_to_bytes().unwrap())).await).await;
        assert_eq!(status, 204);
        // From a removed member: etcd's 403, which tells it it was removed.
        m.from = 9;
        let (status, _, body) = answer(h.handle(request("POST", "/raft", &peer_headers(CLUSTER), m.write_to_bytes().unwrap())).await).await;
        assert_eq!(
            (status, &body[..]),
            (
                403,
                &b"cannot process message from removed member
"[..]
            )
        );
    }

    #[tokio::test]
    async fn streams_are_refused_to_strangers_and_opened_to_members() {
        let dir = tempfile::tempdir().unwrap();
        let (h, mut t) = with_transport(true, dir.path());
        let mut headers = peer_headers(CLUSTER);
        headers.push(("X-Raft-To", "1".into()));
        let (status, hdrs, body) = answer(h.handle(request("GET", "/raft/stream/message/7", &headers, vec![])).await).await;
        assert_eq!((status, &body[..]), (404, &b"error sender not found\n"[..]));
        let (status, _, body) = answer(h.handle(request("GET", "/raft/stream/message/9", &headers, vec![])).await).await;
        assert_eq!((status, &body[..]), (410, &b"removed member\n"[..]));
        assert_eq!(hdrs["X-Server-Version"], handshake::SERVER_VERSION);
        let r = h.handle(request("GET", "/raft/stream/message/2", &headers, vec![])).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["X-Etcd-Cluster-ID"], "c1");
        // The member's messages now go on this stream: one sent is the body's first frame.
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        (m.from, m.to, m.term, m.commit) = (1, 2, 3, 4);
        keel_raft::Transport::send(&mut t, vec![m.clone()]);
        let mut body = r.into_body();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let mut buf = bytes::BytesMut::from(&frame[..]);
        let got = tokio_util::codec::Decoder::decode(&mut crate::rafthttp::codec::MessageCodec::default(), &mut buf).unwrap().unwrap();
        assert_eq!(got, m);
        assert!(t.active_since(2).is_some(), "the peer is active while its stream is open");
        drop(body);
        assert!(t.active_since(2).is_none(), "and inactive once it closes");
    }

    #[tokio::test]
    async fn forwarded_lease_requests_get_etcds_answers() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(true, dir.path());
        let ask = |path: &'static str, body: Vec<u8>| request("POST", path, &[], body);
        let (status, headers, body) = answer(h.handle(ask(LEASE_PATH, LeaseKeepAliveRequest { id: 7 }.encode_to_vec())).await).await;
        assert_eq!((status, headers[http::header::CONTENT_TYPE].to_str().unwrap()), (200, "application/protobuf"));
        let r = keel_proto::etcdserverpb::LeaseKeepAliveResponse::decode(&body[..]).unwrap();
        assert_eq!((r.id, r.ttl), (7, 30));
        let (status, _, body) = answer(h.handle(ask(LEASE_PATH, LeaseKeepAliveRequest { id: 8 }.encode_to_vec())).await).await;
        assert_eq!((status, &body[..]), (404, &b"lease not found\n"[..]));
        let q = LeaseInternalRequest { request: Some(LeaseTimeToLiveRequest { id: 7, keys: true }) }.encode_to_vec();
        let (status, _, body) = answer(h.handle(ask(LEASE_INTERNAL_PATH, q)).await).await;
        assert_eq!(status, 200);
        let r = LeaseInternalResponse::decode(&body[..]).unwrap().response.unwrap();
        assert_eq!((r.ttl, r.granted_ttl, r.keys), (29, 30, vec![b"k".to_vec()]));
        let (status, _, body) = answer(h.handle(ask(LEASE_PATH, vec![0xff; 3])).await).await;
        assert_eq!((status, &body[..]), (400, &b"error unmarshalling request\n"[..]));
        let (status, _, _) = answer(h.handle(ask(LEASE_PATH, vec![0; 70 * 1024])).await).await;
        assert_eq!(status, 413);
        let follower = handler(false, dir.path());
        let (status, _, body) = answer(follower.handle(ask(LEASE_PATH, LeaseKeepAliveRequest { id: 7 }.encode_to_vec())).await).await;
        assert_eq!((status, &body[..]), (400, &b"not a primary lessor\n"[..]));
    }

    #[tokio::test]
    async fn snapshots_that_are_not_snapshots_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(true, dir.path());
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        let proto = m.write_to_bytes().unwrap();
        let mut body = (proto.len() as u64).to_be_bytes().to_vec();
        body.extend_from_slice(&proto);
        let (status, _, text) = answer(h.handle(request("POST", "/raft/snapshot", &peer_headers(CLUSTER), body)).await).await;
        assert_eq!((status, &text[..]), (400, &b"wrong raft message type\n"[..]));
        // A snapshot larger than the bound is refused while it arrives.
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        m.mut_snapshot().mut_metadata().index = 9;
        let proto = m.write_to_bytes().unwrap();
        let mut body = (proto.len() as u64).to_be_bytes().to_vec();
        body.extend_from_slice(&proto);
        body.extend(std::iter::repeat_n(0u8, 2 << 20));
        let (status, _, text) = answer(h.handle(request("POST", "/raft/snapshot", &peer_headers(CLUSTER), body)).await).await;
        assert_eq!(status, 500, "{}", String::from_utf8_lossy(&text));
        assert!(String::from_utf8_lossy(&text).starts_with("failed to save KV snapshot"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing of the refused snapshot stays");
        let (status, _, text) = answer(h.handle(request("POST", "/raft/snapshot", &peer_headers(CLUSTER), vec![0, 0])).await).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&text));
    }

    #[tokio::test]
    async fn keels_records_are_offered_and_a_damaged_or_cut_body_is_refused_leaving_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(true, dir.path());
        let (status, _, text) = answer(h.handle(request("GET", records::FORMAT_PATH, &[], vec![])).await).await;
        assert_eq!((status, &text[..]), (200, records::FORMAT.as_bytes()));
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        m.mut_snapshot().mut_metadata().index = 9;
        let proto = m.write_to_bytes().unwrap();
        let mut head = (proto.len() as u64).to_be_bytes().to_vec();
        head.extend_from_slice(&proto);
        let mut frames = bytes::BytesMut::new();
        let mut enc = records::Encoder::default();
        enc.record(&mut frames, keel_mvcc::backend::TABLE_AUX, b"a", b"b");
        let cut = frames.len();
        enc.end(&mut frames, &keel_mvcc::backend::Meta::default());
        let mut damaged = frames.to_vec();
        damaged[cut - 1] ^= 1;
        for (what, tail) in [("cut before its end", &frames[..cut]), ("with a changed byte", &damaged[..])] {
            let body = [head.clone(), tail.to_vec()].concat();
            let (status, _, text) = answer(h.handle(request("POST", records::FORMAT_PATH, &peer_headers(CLUSTER), body)).await).await;
            let text = String::from_utf8_lossy(&text);
            assert_eq!(status, 500, "{what}: {text}");
            assert!(text.starts_with("failed to save KV snapshot"), "{what}: {text}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{what}: nothing of the refused snapshot stays");
        }
        // From another cluster: refused before the body is read.
        let (status, _, _) = answer(h.handle(request("POST", records::FORMAT_PATH, &peer_headers(CLUSTER + 1), head)).await).await;
        assert_eq!(status, 412);
    }

    #[tokio::test]
    async fn probes_and_unknown_paths() {
        let dir = tempfile::tempdir().unwrap();
        let h = handler(true, dir.path());
        let (status, _, body) = answer(h.handle(request("GET", "/raft/probing", &[], vec![])).await).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["OK"], true);
        let (status, _, body) = answer(h.handle(request("GET", "/raft/nothing", &[], vec![])).await).await;
        assert_eq!((status, &body[..]), (404, &b"404 page not found\n"[..]));
    }
}

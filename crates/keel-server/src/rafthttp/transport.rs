//! The raft transport over etcd's peer protocol: what this member sends each peer and how
//! (etcd's `rafthttp.Transport` and `peer`), and the state of its link to each peer.
//!
//! Each peer has a [`Link`]: two outgoing streams the peer opened (it is their receiver; see
//! [`crate::rafthttp::stream`]), a pipeline (`POST /raft`, [`crate::rafthttp::pipeline`]) for
//! when neither is open, and the readers of the two streams this member opens on the peer.
//! A message goes, as etcd picks: an append on the msgappv2 stream if it is open, anything else
//! (and appends when that one is not) on the message stream, else the pipeline; snapshots on
//! their own request ([`crate::rafthttp::snapshot`]). Sending never blocks the raft thread: every
//! route is a bounded queue, and a full one drops the message and reports the peer unreachable
//! to raft, which retries.
//!
//! Owns the links and the outgoing queues. Calls the node (step, unreachable, snapshot status),
//! the peer dialer and the HTTP client, and reads the member list.

use crate::membership::Members;
use crate::peer::Dialer;
use crate::rafthttp::client::{Answer, Pool};
use crate::rafthttp::handshake::{id_string, StreamKind};
use crate::rafthttp::reader::{Reader, Readers};
use crate::rafthttp::snapshot::BackendFiles;
use crate::rafthttp::writer::DirectWriter;
use crate::rafthttp::{pipeline, probe, snapshot, stream};
use keel_proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, Member};
use keel_raft::eraftpb::{Message, MessageType};
use keel_raft::NodeHandle;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;

/// Messages queued on an outgoing stream (etcd's `streamBufSize`).
pub const STREAM_QUEUE: usize = 4096;
/// Messages queued for the pipeline (etcd's `pipelineBufSize`).
pub const PIPELINE_QUEUE: usize = 64;

/// The state shared by the transport, its streams, pipeline, prober and snapshot sender.
pub(crate) struct Shared {
    pub(crate) id: u64,
    pub(crate) cluster_id: u64,
    /// This member's advertised peer URLs (`X-PeerURLs`).
    pub(crate) urls: Vec<String>,
    members: Arc<RwLock<Members>>,
    pub(crate) dialer: Dialer,
    /// HTTP/1.1 connections kept to peers for requests (pipeline, probes, forwarding).
    pub(crate) pool: Pool,
    pub(crate) rt: tokio::runtime::Handle,
    node: OnceLock<NodeHandle>,
    links: Mutex<HashMap<u64, Arc<Link>>>,
    /// How the backend goes into a snapshot and comes out of one.
    pub(crate) files: Arc<dyn BackendFiles>,
    /// Where snapshots are staged (the member's snap directory).
    pub(crate) snap_dir: PathBuf,
    /// Told when a peer says this member was removed from the cluster.
    removed: Arc<tokio::sync::Notify>,
    /// The raft thread's poll, once the node has it ([`keel_raft::Transport::attach`]):
    /// incoming streams over plain TCP are registered there and read by the raft thread.
    registry: OnceLock<mio::Registry>,
    /// Incoming streams opened but not yet taken by the raft thread.
    arrivals: Mutex<Vec<Reader>>,
    arrived: AtomicBool,
    next_token: AtomicUsize,
}

/// This member's link to one peer.
pub(crate) struct Link {
    pub(crate) id: u64,
    /// The peer's ID as etcd prints it, for metric labels and logs.
    pub(crate) label: String,
    /// `etcd_network_peer_sent_bytes_total` for the peer, looked up once (the raft thread adds
    /// to it on every send).
    pub(crate) sent_bytes: keel_metrics::Counter,
    /// The outgoing streams the peer opened, by kind (msgappv2, message).
    writers: [Mutex<Option<Route>>; 2],
    pipeline: mpsc::Sender<Message>,
    state: Mutex<LinkState>,
}

/// How messages reach one outgoing stream.
#[derive(Clone)]
pub(crate) enum Route {
    /// Through a queue that the stream's HTTP answer body takes from ([`stream::Outgoing`]).
    Queue(mpsc::Sender<Message>),
    /// Written to the socket by the sender itself ([`DirectWriter`]).
    Direct(Arc<DirectWriter>),
}

impl Route {
    fn is_closed(&self) -> bool {
        match self {
            Route::Queue(q) => q.is_closed(),
            Route::Direct(w) => w.is_closed(),
        }
    }

    /// Ends the stream this route feeds.
    fn close(self) {
        if let Route::Direct(w) = self {
            w.close();
        }
    }
}

#[derive(Default)]
struct LinkState {
    /// Streams up in either direction.
    streams: usize,
    /// Since when at least one has been up.
    since: Option<Instant>,
}

fn slot(kind: StreamKind) -> usize {
    match kind {
        StreamKind::MsgAppV2 => 0,
        StreamKind::Message => 1,
    }
}

impl Link {
    /// A link to peer `id`, and the receiving end of its pipeline's queue.
    pub(crate) fn new(id: u64) -> (Arc<Link>, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(PIPELINE_QUEUE);
        let link = Arc::new(Link {
            id,
            label: id_string(id),
            sent_bytes: keel_metrics::METRICS.peer_sent_bytes.with_label_values(&[&id_string(id)]),
            writers: [Mutex::new(None), Mutex::new(None)],
            pipeline: tx,
            state: Mutex::new(LinkState::default()),
        });
        (link, rx)
    }

    /// A stream to or from the peer came up.
    pub(crate) fn stream_up(&self, local: u64) {
        let mut s = self.state.lock();
        s.streams += 1;
        if s.since.is_none() {
            s.since = Some(Instant::now());
            keel_metrics::METRICS.active_peers.with_label_values(&[&id_string(local), &self.label]).set(1);
            tracing::info!(remote_peer_id = %self.label, "peer became active");
        }
    }

    /// A stream to or from the peer went down.
    pub(crate) fn stream_down(&self, local: u64) {
        let mut s = self.state.lock();
        s.streams = s.streams.saturating_sub(1);
        if s.streams == 0 && s.since.take().is_some() {
            keel_metrics::METRICS.active_peers.with_label_values(&[&id_string(local), &self.label]).set(0);
            tracing::warn!(remote_peer_id = %self.label, "peer became inactive (message send to peer failed)");
        }
    }

    fn writer(&self, kind: StreamKind) -> Option<Route> {
        self.writers[slot(kind)].lock().as_ref().filter(|t| !t.is_closed()).cloned()
    }

    /// Where `m` goes, as etcd's `peer.pick`.
    fn pick(&self, m: &Message) -> Route {
        if m.get_msg_type() == MessageType::MsgAppend {
            if let Some(w) = self.writer(StreamKind::MsgAppV2) {
                return w;
            }
        }
        self.writer(StreamKind::Message).unwrap_or_else(|| Route::Queue(self.pipeline.clone()))
    }
}

impl Shared {
    pub(crate) fn node(&self) -> Option<&NodeHandle> {
        self.node.get()
    }

    pub(crate) fn registry(&self) -> Option<&mio::Registry> {
        self.registry.get()
    }

    /// A poll token for a new incoming stream.
    pub(crate) fn next_token(&self) -> mio::Token {
        mio::Token(self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    /// An incoming stream for the raft thread to take.
    pub(crate) fn arrive(&self, r: Reader) {
        self.arrivals.lock().push(r);
        self.arrived.store(true, Ordering::Release);
    }

    pub(crate) fn take_arrivals(&self) -> Vec<Reader> {
        if !self.arrived.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.arrivals.lock())
    }

    pub(crate) fn is_member(&self, id: u64) -> bool {
        self.members.read().get(id).is_some()
    }

    /// What this member knows of `id`, for a peer's request.
    pub(crate) fn sender(&self, id: u64) -> crate::rafthttp::handshake::Sender {
        use crate::rafthttp::handshake::Sender;
        let m = self.members.read();
        if m.get(id).is_some() {
            Sender::Member
        } else if m.is_removed(id) {
            Sender::Removed
        } else {
            Sender::Unknown
        }
    }

    /// The peer URLs of member `id` (empty once it is removed).
    pub(crate) fn peer_urls(&self, id: u64) -> Vec<String> {
        self.members.read().get(id).map(|m| m.peer_urls.clone()).unwrap_or_default()
    }

    /// A peer said this member was removed from the cluster.
    pub(crate) fn removed(&self) {
        self.removed.notify_one();
    }

    pub(crate) fn unreachable(&self, to: u64) {
        if let Some(n) = self.node.get() {
            n.report_unreachable(to);
        }
    }

    /// The link to member `id`, made (with its tasks) the first time; None for a non-member.
    pub(crate) fn link(self: &Arc<Self>, id: u64) -> Option<Arc<Link>> {
        if let Some(l) = self.links.lock().get(&id) {
            return Some(l.clone());
        }
        if id == self.id || !self.is_member(id) {
            return None;
        }
        let mut links = self.links.lock();
        if let Some(l) = links.get(&id) {
            return Some(l.clone());
        }
        let (link, rx) = Link::new(id);
        links.insert(id, link.clone());
        drop(links);
        tracing::info!(remote_peer_id = %link.label, "added remote peer");
        pipeline::start(self.clone(), link.clone(), rx);
        for kind in [StreamKind::MsgAppV2, StreamKind::Message] {
            self.rt.spawn(stream::read_loop(self.clone(), link.clone(), kind));
        }
        self.rt.spawn(probe::run(self.clone(), link.clone()));
        Some(link)
    }

    /// Forgets the link to a member no longer in the cluster (its tasks end by themselves).
    fn drop_removed(&self) {
        let members = self.members.read();
        self.links.lock().retain(|id, l| {
            let keep = members.get(*id).is_some();
            if !keep {
                for w in &l.writers {
                    if let Some(r) = w.lock().take() {
                        r.close();
                    }
                }
                tracing::info!(remote_peer_id = %l.label, "removed remote peer");
            }
            keep
        });
    }

    /// A peer opened stream `kind` to receive its messages from this member: the queue now
    /// feeding it (the previous stream of that kind, if any, ends).
    pub(crate) fn attach(self: &Arc<Self>, from: u64, kind: StreamKind) -> Option<(Arc<Link>, mpsc::Receiver<Message>)> {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let link = self.attach_route(from, kind, Route::Queue(tx))?;
        Some((link, rx))
    }

    /// As [`Shared::attach`], for a stream this member writes itself.
    pub(crate) fn attach_direct(self: &Arc<Self>, from: u64, kind: StreamKind, w: Arc<DirectWriter>) -> Option<Arc<Link>> {
        self.attach_route(from, kind, Route::Direct(w))
    }

    fn attach_route(self: &Arc<Self>, from: u64, kind: StreamKind, route: Route) -> Option<Arc<Link>> {
        let link = self.link(from)?;
        if let Some(old) = link.writers[slot(kind)].lock().replace(route) {
            if !old.is_closed() {
                tracing::warn!(remote_peer_id = %link.label, stream_type = kind.name(), "closed an existing TCP streaming connection with remote peer");
            }
            old.close();
        }
        Some(link)
    }

    /// A stream this member wrote itself ended: it no longer takes messages.
    pub(crate) fn detach_direct(&self, link: &Link, kind: StreamKind, w: &Arc<DirectWriter>) {
        let mut held = link.writers[slot(kind)].lock();
        if matches!(&*held, Some(Route::Direct(cur)) if Arc::ptr_eq(cur, w)) {
            held.take();
        }
    }
}

/// The raft transport over etcd's peer protocol. Clone it freely; clones share the links (the
/// incoming streams the raft thread reads are the node's clone's alone).
pub struct Transport {
    inner: Arc<Shared>,
    readers: Readers,
}

impl Clone for Transport {
    fn clone(&self) -> Transport {
        Transport { inner: self.inner.clone(), readers: Readers::default() }
    }
}

/// What a transport needs to know of its member.
pub struct Setup {
    pub id: u64,
    pub cluster_id: u64,
    /// The member's advertised peer URLs.
    pub urls: Vec<String>,
    pub members: Arc<RwLock<Members>>,
    pub dialer: Dialer,
    /// The peer runtime: streams, pipeline and snapshots run there, away from client load.
    pub rt: tokio::runtime::Handle,
    pub files: Arc<dyn BackendFiles>,
    pub snap_dir: PathBuf,
    /// Told when a peer says this member was removed from the cluster.
    pub removed: Arc<tokio::sync::Notify>,
}

impl Transport {
    pub fn new(s: Setup) -> Transport {
        Transport {
            inner: Arc::new(Shared {
                id: s.id,
                cluster_id: s.cluster_id,
                urls: s.urls,
                members: s.members,
                pool: Pool::new(s.dialer.clone()),
                dialer: s.dialer,
                rt: s.rt,
                node: OnceLock::new(),
                links: Mutex::new(HashMap::new()),
                files: s.files,
                snap_dir: s.snap_dir,
                removed: s.removed,
                registry: OnceLock::new(),
                arrivals: Mutex::new(Vec::new()),
                arrived: AtomicBool::new(false),
                next_token: AtomicUsize::new(1),
            }),
            readers: Readers::default(),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner
    }

    /// Connects the transport to the node it reports to.
    pub fn set_node(&self, node: NodeHandle) {
        let _ = self.inner.node.set(node);
    }

    /// How many remote members a stream is up with now.
    pub fn active_peers(&self) -> usize {
        self.inner.links.lock().values().filter(|l| l.state.lock().since.is_some()).count()
    }

    /// Since when a stream to or from member `id` has been up, if one is.
    pub fn active_since(&self, id: u64) -> Option<Instant> {
        self.inner.links.lock().get(&id).and_then(|l| l.state.lock().since)
    }

    /// Keeps links to every member, whether or not raft has something to send, so that
    /// connectivity is known (etcd's strict reconfiguration checks rely on it), and drops the
    /// links of removed members.
    pub fn keep_connected(&self) {
        let s = self.inner.clone();
        self.inner.rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let ids: Vec<u64> = s.members.read().ids().collect();
                for id in ids {
                    s.link(id);
                }
                s.drop_removed();
            }
        });
    }

    /// Asks the leader to promote learner `id` (only it knows the learner's progress), as
    /// etcd's followers do: `POST /members/promote/<id>` on its peer URLs.
    pub async fn forward_promote(&self, leader: u64, id: u64) -> Result<Vec<Member>, crate::error::Error> {
        use crate::error::Error;
        let path = format!("/members/promote/{id}");
        let a = self.request(leader, &path, Vec::new(), "application/json", Duration::from_secs(5)).await.map_err(Error::Forwarded)?;
        let body = String::from_utf8_lossy(&a.body);
        match a.status.as_u16() {
            200 => {
                let list: Vec<crate::membership::MemberJson> = serde_json::from_slice(&a.body)
                    .map_err(|e| Error::Forwarded(Status::internal(format!("member promote: bad answer: {e}"))))?;
                Ok(Members { cluster_id: 0, members: list.into_iter().map(Into::into).collect(), removed: vec![] }.to_proto())
            }
            408 => Err(Error::Timeout),
            404 => Err(Error::MemberNotFound),
            412 if body.contains("can only promote a learner member which is in sync with leader") => Err(Error::LearnerNotReady),
            412 if body.contains("can only promote a learner member") => Err(Error::NotLearner),
            _ => Err(Error::Forwarded(Status::unavailable(format!("member promote: unknown error({})", body.trim_end())))),
        }
    }

    /// Renews a lease on the leader (`POST /leases`); its TTL, 0 when there is no such lease.
    pub async fn forward_lease_renew(&self, leader: u64, id: i64) -> Result<i64, Status> {
        let body = LeaseKeepAliveRequest { id }.encode_to_vec();
        let a = self.request(leader, crate::rafthttp::handler::LEASE_PATH, body, "application/protobuf", Duration::from_secs(5)).await?;
        match a.status.as_u16() {
            200 => {
                let r = LeaseKeepAliveResponse::decode(a.body.as_ref()).map_err(|e| Status::internal(format!("lease: {e}")))?;
                if r.id != id {
                    return Err(Status::internal("lease: renew id mismatch"));
                }
                Ok(r.ttl)
            }
            404 => Ok(0),
            408 => Err(Status::unavailable(crate::rafthttp::handler::LEASE_TIMEOUT)),
            _ => Err(Status::unavailable(format!("lease: unknown error({})", String::from_utf8_lossy(&a.body).trim_end()))),
        }
    }

    /// Asks the leader for a lease's remaining TTL (`POST /leases/internal`); TTL -1 when
    /// there is no such lease.
    pub async fn forward_lease_ttl(&self, leader: u64, req: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, Status> {
        let (id, keys) = (req.id, req.keys);
        let body = crate::rafthttp::handler::LeaseInternalRequest { request: Some(req) }.encode_to_vec();
        let a = self
            .request(leader, crate::rafthttp::handler::LEASE_INTERNAL_PATH, body, "application/protobuf", Duration::from_secs(5))
            .await?;
        match a.status.as_u16() {
            200 => {
                let r = crate::rafthttp::handler::LeaseInternalResponse::decode(a.body.as_ref())
                    .map_err(|e| Status::internal(format!("lease: {e}")))?;
                let r = r.response.unwrap_or_default();
                if r.id != id {
                    return Err(Status::internal("lease: TTL id mismatch"));
                }
                Ok(LeaseTimeToLiveResponse { keys: if keys { r.keys } else { vec![] }, ..r })
            }
            404 => Ok(LeaseTimeToLiveResponse { id, ttl: -1, ..Default::default() }),
            408 => Err(Status::unavailable(crate::rafthttp::handler::LEASE_TIMEOUT)),
            _ => Err(Status::unavailable(format!("lease: unknown error({})", String::from_utf8_lossy(&a.body).trim_end()))),
        }
    }

    /// `POST <path>` with `body` on member `to`, trying its peer URLs in turn.
    /// Member `id`'s server version, as etcd's leader asks it: `GET /version` on each of its
    /// peer URLs until one answers (`{"etcdserver": ...}`); None when none does.
    pub async fn server_version(&self, id: u64) -> Option<semver::Version> {
        for u in self.inner.peer_urls(id) {
            let answer = tokio::time::timeout(Duration::from_secs(5), self.inner.pool.get(&u, "/version")).await;
            let a = match answer {
                Ok(Ok(a)) if a.status.is_success() => a,
                Ok(Ok(a)) => {
                    tracing::warn!(address = %format!("{u}/version"), remote_member_id = %id_string(id), status = %a.status, "failed to get version");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(address = %format!("{u}/version"), remote_member_id = %id_string(id), error = %format!("{e:#}"), "failed to reach the peer URL");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(address = %format!("{u}/version"), remote_member_id = %id_string(id), "failed to reach the peer URL: timed out");
                    continue;
                }
            };
            let server = serde_json::from_slice::<serde_json::Value>(&a.body)
                .ok()
                .and_then(|v| v.get("etcdserver").and_then(|s| s.as_str()).map(str::to_string));
            match server.as_deref().map(semver::Version::parse) {
                Some(Ok(v)) => return Some(v),
                _ => {
                    tracing::warn!(
                        remote_member_id = %id_string(id),
                        remote_member_version = %String::from_utf8_lossy(&a.body),
                        "failed to parse server version of remote member"
                    );
                    return None;
                }
            }
        }
        None
    }

    /// Member `id`'s hash at `rev` (etcd's `HashByRev` over the peer URLs: `GET
    /// /members/hashkv` with a JSON `HashKVRequest`), each peer URL tried in turn.
    pub async fn peer_hash_kv(
        &self,
        id: u64,
        rev: i64,
        timeout: Duration,
    ) -> Result<crate::kv_hash::PeerHashKv, crate::kv_hash::PeerError> {
        use crate::kv_hash::{PeerError, PeerHashKvRequest, HASH_KV_PATH};
        let body = serde_json::to_vec(&PeerHashKvRequest { revision: rev }).map_err(|e| PeerError::Other(e.to_string()))?;
        let headers = [("Content-Type", "application/json".to_string()), ("X-Etcd-Cluster-ID", id_string(self.inner.cluster_id))];
        let mut last = PeerError::Other(format!("member {} has no peer URL", id_string(id)));
        for u in self.inner.peer_urls(id) {
            let answer =
                tokio::time::timeout(timeout, self.inner.pool.get_with_body(&u, HASH_KV_PATH, &headers, body.clone().into())).await;
            let a = match answer {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    last = PeerError::Other(format!("{e:#}"));
                    continue;
                }
                Err(_) => {
                    last = PeerError::Other("timed out".into());
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&a.body);
            return match a.status.as_u16() {
                200 => serde_json::from_slice(&a.body).map_err(|e| PeerError::Other(format!("bad answer: {e}"))),
                400 if text.contains("required revision has been compacted") => Err(PeerError::Compacted),
                400 if text.contains("required revision is a future revision") => Err(PeerError::FutureRev),
                412 if text.contains("cluster ID mismatch") => Err(PeerError::ClusterIdMismatch),
                _ => Err(PeerError::Other(format!("unknown error: {}", text.trim_end()))),
            };
        }
        Err(last)
    }

    async fn request(&self, to: u64, path: &str, body: Vec<u8>, content_type: &str, timeout: Duration) -> Result<Answer, Status> {
        let urls = self.inner.peer_urls(to);
        if urls.is_empty() {
            return Err(Status::unavailable("etcdserver: no leader"));
        }
        let mut last = String::new();
        for u in &urls {
            let headers = [("Content-Type", content_type.to_string())];
            match tokio::time::timeout(timeout, self.inner.pool.post(u, path, &headers, body.clone().into())).await {
                Ok(Ok(a)) => return Ok(a),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(Status::unavailable(format!("{path} on {}: {last}", id_string(to))))
    }
}

impl keel_raft::Transport for Transport {
    fn attach(&mut self, registry: &mio::Registry) {
        match registry.try_clone() {
            Ok(r) => {
                let _ = self.inner.registry.set(r);
            }
            Err(e) => tracing::warn!(error = %e, "raft streams are read off the raft thread: cannot share its poll"),
        }
    }

    fn receive(&mut self, ready: &[mio::Token], out: &mut Vec<Message>) {
        self.readers.receive(&self.inner, ready, out);
    }

    fn send(&mut self, msgs: Vec<Message>) {
        let metrics = &keel_metrics::METRICS;
        // Streams written directly get one chunk per call: their batches are flushed at the end.
        let mut batches: Vec<(Arc<DirectWriter>, Arc<Link>)> = Vec::new();
        for m in msgs {
            let to = m.to;
            if to == self.inner.id || to == 0 {
                continue;
            }
            let Some(link) = self.inner.link(to) else {
                tracing::debug!(remote_peer_id = %id_string(to), "ignored message send request; unknown remote peer target");
                continue;
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.inner.rt.spawn(snapshot::send(self.inner.clone(), link, m));
                continue;
            }
            let heartbeat = m.get_msg_type() == MessageType::MsgHeartbeat;
            let sent = match link.pick(&m) {
                Route::Queue(q) => q.try_send(m).is_ok(),
                Route::Direct(w) => {
                    let ok = w.push(&m);
                    if ok && !batches.iter().any(|(b, _)| Arc::ptr_eq(b, &w)) {
                        batches.push((w, link.clone()));
                    }
                    ok
                }
            };
            if !sent {
                metrics.peer_sent_failures.with_label_values(&[&link.label]).inc();
                if heartbeat {
                    metrics.heartbeat_failures.inc();
                }
                self.inner.unreachable(to);
            }
        }
        for (w, link) in batches {
            link.sent_bytes.inc_by(w.flush() as u64);
        }
    }
}

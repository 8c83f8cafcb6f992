//! What the peer protocol's tests share: member 1's transport and handler in a two-member
//! cluster, and a peer's request headers.

use crate::membership::Members;
use crate::rafthttp::handler::{Forwarded, Handler, NotPrimary};
use crate::rafthttp::handshake::id_string;
use crate::rafthttp::snapshot::BackendFiles;
use crate::rafthttp::Transport;
use keel_proto::etcdserverpb::{LeaseTimeToLiveRequest, LeaseTimeToLiveResponse};
use keel_proto::keelpb::MemberRecord;
use std::sync::Arc;

pub(crate) struct NoFiles;
impl BackendFiles for NoFiles {
    fn export(&self, _out: std::fs::File) -> anyhow::Result<()> {
        anyhow::bail!("no backend")
    }
    fn import(&self, _bolt: &std::path::Path, _dest: &std::path::Path) -> anyhow::Result<()> {
        anyhow::bail!("no backend")
    }
    fn backend(&self) -> anyhow::Result<keel_mvcc::backend::Backend> {
        anyhow::bail!("no backend")
    }
}

/// Lease 7 exists with TTL 30 on this leader.
pub(crate) struct Lessor {
    pub(crate) leading: bool,
}
impl Forwarded for Lessor {
    fn lease_renew(&self, id: i64) -> futures::future::BoxFuture<'_, Result<Option<i64>, NotPrimary>> {
        let r = if self.leading { Ok((id == 7).then_some(30)) } else { Err(NotPrimary) };
        Box::pin(std::future::ready(r))
    }
    fn lease_time_to_live(&self, r: &LeaseTimeToLiveRequest) -> Result<Option<LeaseTimeToLiveResponse>, NotPrimary> {
        if !self.leading {
            return Err(NotPrimary);
        }
        Ok((r.id == 7).then(|| LeaseTimeToLiveResponse { id: 7, ttl: 29, granted_ttl: 30, keys: vec![b"k".to_vec()], header: None }))
    }
}

pub(crate) const CLUSTER: u64 = 0xc1;

/// Member 1's transport and handler, in a cluster with member 2 (and 9 removed).
pub(crate) fn with_transport(leading: bool, dir: &std::path::Path) -> (Handler, Transport) {
    with_peer(leading, dir, "http://127.0.0.1:3")
}

/// As [`with_transport`], member 2 at `peer_url`.
pub(crate) fn with_peer(leading: bool, dir: &std::path::Path, peer_url: &str) -> (Handler, Transport) {
    let record = |id: u64, url: String| MemberRecord { id, name: format!("m{id}"), peer_urls: vec![url], ..Default::default() };
    let members = Members {
        cluster_id: CLUSTER,
        members: vec![record(1, "http://127.0.0.1:2".into()), record(2, peer_url.into())],
        removed: vec![9],
    };
    let t = Transport::new(crate::rafthttp::Setup {
        id: 1,
        cluster_id: CLUSTER,
        urls: vec!["http://127.0.0.1:2".into()],
        members: Arc::new(parking_lot::RwLock::new(members)),
        dialer: crate::peer::Dialer::new(None, None),
        rt: tokio::runtime::Handle::current(),
        files: Arc::new(NoFiles),
        snap_dir: dir.to_path_buf(),
        removed: Arc::new(tokio::sync::Notify::new()),
    });
    (Handler::new(&t, Arc::new(Lessor { leading }), Some(1 << 20)), t)
}

/// The headers member 2 sends with its requests.
pub(crate) fn peer_headers(cluster: u64) -> Vec<(&'static str, String)> {
    vec![
        ("X-Server-From", "2".into()),
        ("X-Server-Version", "3.6.16".into()),
        ("X-Min-Cluster-Version", "3.0.0".into()),
        ("X-Etcd-Cluster-ID", id_string(cluster)),
    ]
}

//! etcd's `.snap` files (`%016x-%016x.snap`, term and index): a `snappb.Snapshot{crc, data}`
//! whose data, checked by its CRC-32C, is a `raftpb.Snapshot` carrying etcd's v2 store as JSON.
//! Keel needs the membership from it (etcd 3.4 keeps members only there), read by
//! [`keel_server::v2store`].

use super::wal::ConfState;
use anyhow::{bail, Context, Result};
use keel_proto::keelpb::MemberRecord;
use prost::Message;
use std::path::Path;

#[derive(Clone, PartialEq, prost::Message)]
struct SnapFile {
    #[prost(uint32, tag = "1")]
    crc: u32,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RaftSnapshot {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    metadata: Option<SnapshotMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotMetadata {
    #[prost(message, optional, tag = "1")]
    conf_state: Option<ConfState>,
    #[prost(uint64, tag = "2")]
    index: u64,
    #[prost(uint64, tag = "3")]
    term: u64,
}

/// A snapshot as etcd saved it.
#[derive(Debug, Default)]
pub struct Snap {
    pub index: u64,
    pub term: u64,
    /// Members of the v2 store, in ID order.
    pub members: Vec<MemberRecord>,
    /// IDs under `/0/removed_members`.
    pub removed: Vec<u64>,
}

/// Reads and checks the `.snap` file at `path`.
pub fn read(path: &Path) -> Result<Snap> {
    let name = path.display();
    let b = std::fs::read(path).with_context(|| format!("read {name}"))?;
    let f = SnapFile::decode(b.as_slice()).map_err(|e| anyhow::anyhow!("{name}: offset 0: undecodable snapshot file: {e}"))?;
    if crc32c::crc32c(&f.data) != f.crc {
        bail!("{name}: offset 0: snapshot CRC mismatch");
    }
    let s = RaftSnapshot::decode(f.data.as_slice()).map_err(|e| anyhow::anyhow!("{name}: undecodable raft snapshot: {e}"))?;
    let meta = s.metadata.unwrap_or_default();
    let mut snap = Snap { index: meta.index, term: meta.term, ..Default::default() };
    if !s.data.is_empty() {
        let m = keel_server::v2store::decode(&s.data).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        snap.members = m.members;
        snap.removed = m.removed;
    }
    snap.members.sort_by_key(|m| m.id);
    Ok(snap)
}

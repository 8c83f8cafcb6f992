//! etcd's `.snap` files (`%016x-%016x.snap`, term and index): a `snappb.Snapshot{crc, data}`
//! whose data, checked by its CRC-32C, is a `raftpb.Snapshot` carrying etcd's v2 store as JSON.
//! Keel needs the membership from it (etcd 3.4 keeps members only there): `/0/members/<id>`
//! nodes with `raftAttributes` (`peerURLs`, `isLearner`) and `attributes` (`name`, `clientURLs`).

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
        let v: serde_json::Value = serde_json::from_slice(&s.data).map_err(|e| anyhow::anyhow!("{name}: the v2 store is not JSON: {e}"))?;
        let node = |v: &serde_json::Value, path: &[&str]| -> Option<serde_json::Value> {
            let mut n = v.get("Root")?;
            for p in path {
                n = n.get("Children")?.get(*p)?;
            }
            Some(n.clone())
        };
        if let Some(members) = node(&v, &["0", "members"]).and_then(|m| m.get("Children").cloned()) {
            for (hex, m) in members.as_object().into_iter().flatten() {
                let id = u64::from_str_radix(hex, 16).with_context(|| format!("{name}: member {hex:?} is not a hex ID"))?;
                let attr = |which: &str| -> serde_json::Value {
                    m.get("Children")
                        .and_then(|c| c.get(which))
                        .and_then(|a| a.get("Value"))
                        .and_then(|v| v.as_str())
                        .and_then(|s| serde_json::from_str(s).ok())
                        .unwrap_or(serde_json::Value::Null)
                };
                let (raft, attrs) = (attr("raftAttributes"), attr("attributes"));
                let strings = |v: &serde_json::Value, k: &str| -> Vec<String> {
                    v.get(k)
                        .and_then(|a| a.as_array())
                        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                        .unwrap_or_default()
                };
                snap.members.push(MemberRecord {
                    id,
                    name: attrs.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string(),
                    peer_urls: strings(&raft, "peerURLs"),
                    client_urls: strings(&attrs, "clientURLs"),
                    is_learner: raft.get("isLearner").and_then(|l| l.as_bool()).unwrap_or(false),
                });
            }
        }
        if let Some(removed) = node(&v, &["0", "removed_members"]).and_then(|m| m.get("Children").cloned()) {
            snap.removed.extend(removed.as_object().into_iter().flatten().filter_map(|(hex, _)| u64::from_str_radix(hex, 16).ok()));
        }
    }
    snap.members.sort_by_key(|m| m.id);
    Ok(snap)
}

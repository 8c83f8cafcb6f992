//! Hashes of the key space as etcd's corruption checks exchange them: a hash at a revision
//! ([`KeyValueHash`]), the hashes a member computed when it scheduled its newest compactions
//! ([`CompactionHashes`]: written by the apply stage, read by the checks and by peers'
//! `/members/hashkv`), and that endpoint's JSON ([`PeerHashKv`]). Calls nothing in this crate.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// etcd's peer path for a member's hash at a revision (`GET`, a JSON `HashKVRequest` body).
pub const HASH_KV_PATH: &str = "/members/hashkv";
/// etcd's `hashStorageMaxSize`: compaction hashes kept.
const KEPT: usize = 10;

/// A hash of the key space up to `revision` (etcd's `KeyValueHash`): what HashKV answers;
/// `compact_revision` is the compaction it starts from (-1: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyValueHash {
    pub hash: u32,
    pub compact_revision: i64,
    pub revision: i64,
}

/// etcd's compaction revision in a hash: -1 for a store never compacted (Keel's 0).
pub fn compact_revision(compacted: i64) -> i64 {
    if compacted == 0 {
        -1
    } else {
        compacted
    }
}

/// The hashes this member computed when it scheduled its newest compactions (etcd's
/// `hashStorage`): a peer asked for the hash at a compaction revision gets the one computed
/// before that compaction, so that members compare the same data whatever their compaction's
/// progress.
#[derive(Default)]
pub struct CompactionHashes {
    by_revision: Mutex<BTreeMap<i64, KeyValueHash>>,
}

impl CompactionHashes {
    pub fn store(&self, h: KeyValueHash) {
        tracing::info!(hash = h.hash, revision = h.revision, compact_revision = h.compact_revision, "storing new hash");
        let mut m = self.by_revision.lock();
        m.insert(h.revision, h);
        while m.len() > KEPT {
            m.pop_first();
        }
    }

    /// The hash stored for compaction revision `rev`.
    pub fn at(&self, rev: i64) -> Option<KeyValueHash> {
        self.by_revision.lock().get(&rev).copied()
    }

    /// Every stored hash, newest first.
    pub fn newest_first(&self) -> Vec<KeyValueHash> {
        self.by_revision.lock().values().rev().copied().collect()
    }
}

/// etcd's `HashKVResponse` as its peers exchange it (Go's JSON of the generated struct: snake
/// case, zero values left out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHashKv {
    #[serde(default)]
    pub header: PeerHeader,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub hash: u32,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub compact_revision: i64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub hash_revision: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHeader {
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub cluster_id: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub member_id: u64,
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub revision: i64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub raft_term: u64,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// etcd's `HashKVRequest` as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerHashKvRequest {
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub revision: i64,
}

impl PeerHashKv {
    /// The answer for `h` on a member at `current` revision.
    pub fn new(h: KeyValueHash, current: i64) -> PeerHashKv {
        PeerHashKv {
            header: PeerHeader { revision: current, ..Default::default() },
            hash: h.hash,
            compact_revision: h.compact_revision,
            hash_revision: h.revision,
        }
    }
}

/// Why a peer gave no hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// The revision is compacted on the peer.
    Compacted,
    /// The revision is ahead of the peer.
    FutureRev,
    ClusterIdMismatch,
    Other(String),
}

/// One peer's answer.
#[derive(Debug, Clone)]
pub struct PeerHash {
    pub id: u64,
    pub answer: Result<PeerHashKv, PeerError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hash: u32, compact_revision: i64, revision: i64) -> KeyValueHash {
        KeyValueHash { hash, compact_revision, revision }
    }

    #[test]
    fn compaction_hashes_keep_the_newest_ten() {
        let s = CompactionHashes::default();
        for r in 1..=12 {
            s.store(h(r as u32, r - 1, r));
        }
        let all = s.newest_first();
        assert_eq!(all.len(), 10);
        assert_eq!((all[0].revision, all[9].revision), (12, 3));
        assert_eq!(s.at(2), None);
        assert_eq!(s.at(7), Some(h(7, 6, 7)));
    }

    #[test]
    fn peer_json_is_etcds() {
        let r = PeerHashKv::new(h(7, -1, 10), 12);
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"header":{"revision":12},"hash":7,"compact_revision":-1,"hash_revision":10}"#);
        let back: PeerHashKv = serde_json::from_str(r#"{"header":{"revision":3},"hash_revision":3}"#).unwrap();
        assert_eq!(back, PeerHashKv { header: PeerHeader { revision: 3, ..Default::default() }, hash_revision: 3, ..Default::default() });
        let req: PeerHashKvRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(req.revision, 0);
    }
}

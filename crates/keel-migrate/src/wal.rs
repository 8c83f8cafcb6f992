//! etcd's write-ahead log, read: the records of an etcd member's `member/wal` (keel-wal reads
//! the frames, checksums and segments: etcd's WAL format is Keel's own) decoded as etcd's
//! metadata, entries, hard states and snapshot marks.

use anyhow::{bail, Result};
use prost::Message;
use std::path::Path;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(int64, tag = "1")]
    pub kind: i64,
    #[prost(uint32, tag = "2")]
    pub crc: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// `etcdserverpb.Metadata`, the WAL's metadata record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(uint64, tag = "1")]
    pub node_id: u64,
    #[prost(uint64, tag = "2")]
    pub cluster_id: u64,
}

/// `raftpb.Entry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(int32, tag = "1")]
    pub kind: i32,
    #[prost(uint64, tag = "2")]
    pub term: u64,
    #[prost(uint64, tag = "3")]
    pub index: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub data: Vec<u8>,
}

/// `raftpb.HardState`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HardState {
    #[prost(uint64, tag = "1")]
    pub term: u64,
    #[prost(uint64, tag = "2")]
    pub vote: u64,
    #[prost(uint64, tag = "3")]
    pub commit: u64,
}

/// `raftpb.ConfState`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfState {
    #[prost(uint64, repeated, tag = "1")]
    pub voters: Vec<u64>,
    #[prost(uint64, repeated, tag = "2")]
    pub learners: Vec<u64>,
}

/// `walpb.Snapshot`: a snapshot was saved at this index and term.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotMark {
    #[prost(uint64, tag = "1")]
    pub index: u64,
    #[prost(uint64, tag = "2")]
    pub term: u64,
}

/// `raftpb.ConfChange`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfChange {
    #[prost(int32, tag = "2")]
    pub kind: i32,
    #[prost(uint64, tag = "3")]
    pub node_id: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub context: Vec<u8>,
}

pub const ENTRY_NORMAL: i32 = 0;
pub const ENTRY_CONF_CHANGE: i32 = 1;
pub const CONF_ADD_NODE: i32 = 0;
pub const CONF_REMOVE_NODE: i32 = 1;
pub const CONF_UPDATE_NODE: i32 = 2;
pub const CONF_ADD_LEARNER: i32 = 3;

const METADATA: i64 = 1;
const ENTRY: i64 = 2;
const STATE: i64 = 3;
const SNAPSHOT: i64 = 5;

/// What an etcd WAL holds: identity, the log (a later entry at an index replaces the tail from
/// there, as raft overwrote it), the last hard state, the snapshot marks.
#[derive(Debug, Default)]
pub struct Log {
    pub metadata: Metadata,
    pub entries: Vec<Entry>,
    pub hard_state: HardState,
    pub snapshots: Vec<SnapshotMark>,
}

/// Reads every segment of the WAL in `dir` (keel-wal's reader: etcd's format is Keel's).
pub fn read(dir: &Path) -> Result<Log> {
    let mut log = Log::default();
    let mut saw_metadata = false;
    let name = dir.display();
    for rec in keel_wal::Wal::read(dir).map_err(|e| anyhow::anyhow!("{e}"))? {
        let bad = |what: &str, e: prost::DecodeError| anyhow::anyhow!("{name}: undecodable {what}: {e}");
        match i64::from(rec.kind) {
            METADATA => {
                log.metadata = Metadata::decode(rec.data.as_slice()).map_err(|e| bad("metadata", e))?;
                saw_metadata = true;
            }
            ENTRY => {
                let e = Entry::decode(rec.data.as_slice()).map_err(|e| bad("entry", e))?;
                if let Some(first) = log.entries.first().map(|f| f.index) {
                    if e.index < first {
                        log.entries.clear();
                    } else {
                        log.entries.truncate((e.index - first) as usize);
                    }
                }
                if let Some(last) = log.entries.last() {
                    if last.index + 1 != e.index {
                        bail!("{name}: entry {} follows entry {}", e.index, last.index);
                    }
                }
                log.entries.push(e);
            }
            STATE => {
                let hs = HardState::decode(rec.data.as_slice()).map_err(|e| bad("hard state", e))?;
                // etcd writes empty hard states between entries; keep the last real one.
                if hs != HardState::default() {
                    log.hard_state = hs;
                }
            }
            SNAPSHOT => log.snapshots.push(SnapshotMark::decode(rec.data.as_slice()).map_err(|e| bad("snapshot mark", e))?),
            other => bail!("{name}: unknown record type {other}"),
        }
    }
    if !saw_metadata {
        bail!("{}: the WAL has no metadata record", dir.display());
    }
    Ok(log)
}

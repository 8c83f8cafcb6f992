//! etcd's write-ahead log, read. Segments `%016x-%016x.wal` (sequence, first index) hold frames:
//! an 8-byte little-endian length (the top byte, when its high bit is set, gives 0-7 bytes of
//! padding after the record) and a `walpb.Record{type, crc, data}`. Each record's CRC-32C chains
//! over the data of every record before it; a `crc` record at the start of a segment carries the
//! chain on. Types: metadata (etcd's member and cluster ID), entry, hard state, crc, snapshot.
//! A zero length (the preallocated tail) ends a segment; a torn frame at the very end of the
//! last segment is the end of the log, as etcd reads it; any other damage is an error naming the
//! file and offset.

use anyhow::{bail, Result};
use prost::Message;
use std::path::{Path, PathBuf};

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
const CRC: i64 = 4;
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

/// The WAL segments in `dir`, in order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads every segment of the WAL in `dir`.
pub fn read(dir: &Path) -> Result<Log> {
    let segs = segments(dir)?;
    if segs.is_empty() {
        bail!("{}: no WAL segments", dir.display());
    }
    let mut log = Log::default();
    let mut crc = 0u32;
    let mut saw_metadata = false;
    for (n, path) in segs.iter().enumerate() {
        let last_segment = n + 1 == segs.len();
        let b = std::fs::read(path).map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
        let name = path.display();
        let mut at = 0usize;
        while at + 8 <= b.len() {
            let field = u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
            if field == 0 {
                break;
            }
            let len = (field & !(0xffu64 << 56)) as usize;
            let pad = if field >> 63 == 1 { ((field >> 56) & 0x7) as usize } else { 0 };
            let start = at + 8;
            let end = start.checked_add(len).and_then(|e| e.checked_add(pad));
            let Some(end) = end.filter(|e| *e <= b.len()) else {
                if last_segment {
                    tracing::warn!(file = %name, offset = at, "etcd WAL: torn record at the end of the log ignored");
                    break;
                }
                bail!("{name}: offset {at}: record of {len} bytes runs past the end of the segment");
            };
            let rec = match Record::decode(&b[start..start + len]) {
                Ok(r) => r,
                Err(e) if last_segment && b[start..].iter().all(|x| *x == 0) => {
                    tracing::warn!(file = %name, offset = at, error = %e, "etcd WAL: torn record at the end of the log ignored");
                    break;
                }
                Err(e) => bail!("{name}: offset {at}: undecodable record: {e}"),
            };
            if rec.kind == CRC {
                if crc != 0 && rec.crc != crc {
                    bail!("{name}: offset {at}: CRC chain broken (record says {:08x}, the log before it {:08x})", rec.crc, crc);
                }
                crc = rec.crc;
            } else {
                crc = crc32c::crc32c_append(crc, &rec.data);
                if rec.crc != crc {
                    if last_segment && end == b.len() {
                        tracing::warn!(file = %name, offset = at, "etcd WAL: torn record at the end of the log ignored");
                        break;
                    }
                    bail!("{name}: offset {at}: CRC mismatch (record {:08x}, computed {crc:08x})", rec.crc);
                }
            }
            let bad = |what: &str, e: prost::DecodeError| anyhow::anyhow!("{name}: offset {at}: undecodable {what}: {e}");
            match rec.kind {
                METADATA => {
                    let m = Metadata::decode(rec.data.as_slice()).map_err(|e| bad("metadata", e))?;
                    if saw_metadata && m != log.metadata {
                        bail!("{name}: offset {at}: metadata differs from the first segment's");
                    }
                    log.metadata = m;
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
                            bail!("{name}: offset {at}: entry {} follows entry {}", e.index, last.index);
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
                CRC => {}
                other => bail!("{name}: offset {at}: unknown record type {other}"),
            }
            at = end;
        }
    }
    if !saw_metadata {
        bail!("{}: the WAL has no metadata record", dir.display());
    }
    Ok(log)
}

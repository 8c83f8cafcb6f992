//! The raft log in memory: what raft reads back (entries, terms, hard state, the latest
//! snapshot). The WAL makes it durable; this is rebuilt from the WAL at start.
//!
//! Unlike raft-rs's `MemStorage`, the snapshot kept here carries the application's data, so the
//! leader can send it to a follower that fell behind the compacted log.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use std::sync::Arc;

#[derive(Default)]
pub struct Core {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// The newest snapshot; its metadata marks where `entries` begin.
    pub snapshot: Snapshot,
    /// Entries after the snapshot index (or after `compacted`), contiguous.
    pub entries: Vec<Entry>,
    /// Index and term of the last entry dropped from the front of `entries` (0, 0: none): raft
    /// asks for the term of the entry before the first one it has.
    compacted: (u64, u64),
    /// What a snapshot for a follower is built from: the applied index and its term, and the
    /// application's snapshot data at that index (kept current by the driver).
    pub applied_index: u64,
    pub applied_term: u64,
    /// The configuration as of `applied_index` (raft's own, `conf_state`, may be newer: it
    /// takes configuration changes when it hands them to the apply stage).
    pub applied_conf_state: ConfState,
    pub app_data: Vec<u8>,
}

impl Core {
    pub fn first_index(&self) -> u64 {
        self.entries.first().map(|e| e.index).unwrap_or(self.snapshot.get_metadata().index.max(self.compacted.0) + 1)
    }

    /// The term of entry `idx` if this log knows it (an entry it holds, the snapshot's last one,
    /// or the last one dropped from its front).
    fn term_of(&self, idx: u64) -> Result<u64, StorageError> {
        let m = self.snapshot.get_metadata();
        if idx == m.index {
            return Ok(m.term);
        }
        if idx == self.compacted.0 && idx != 0 {
            return Ok(self.compacted.1);
        }
        let first = self.first_index();
        if idx < first {
            return Err(StorageError::Compacted);
        }
        if idx > self.last_index() {
            return Err(StorageError::Unavailable);
        }
        Ok(self.entries[(idx - first) as usize].term)
    }

    /// Drops the entries before `keep_from` (at most those there are), remembering the last
    /// one's term. Returns how many were dropped.
    pub fn compact(&mut self, keep_from: u64) -> usize {
        let first = self.first_index();
        if keep_from <= first {
            return 0;
        }
        let n = ((keep_from - first) as usize).min(self.entries.len());
        if let Some(last) = n.checked_sub(1).and_then(|i| self.entries.get(i)) {
            self.compacted = (last.index, last.term);
        }
        self.entries.drain(..n);
        n
    }

    pub fn last_index(&self) -> u64 {
        self.entries.last().map(|e| e.index).unwrap_or(self.snapshot.get_metadata().index.max(self.compacted.0))
    }

    /// Appends entries, replacing any existing entries at or after the first new index.
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), String> {
        let Some(first_new) = ents.first().map(|e| e.index) else {
            return Ok(());
        };
        let first = self.first_index();
        if first_new < first {
            return Err(format!("append at {first_new} is before the first index {first}"));
        }
        if first_new > self.last_index() + 1 {
            return Err(format!("append at {first_new} leaves a gap after {}", self.last_index()));
        }
        self.entries.truncate((first_new - first) as usize);
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    /// Replaces the whole log by a snapshot (installed from the leader or loaded at start).
    pub fn apply_snapshot(&mut self, snap: Snapshot) {
        let m = snap.get_metadata();
        if self.hard_state.term < m.term {
            self.hard_state.term = m.term;
        }
        if self.hard_state.commit < m.index {
            self.hard_state.commit = m.index;
        }
        self.conf_state = m.get_conf_state().clone();
        self.entries.clear();
        self.compacted = (0, 0);
        self.snapshot = snap;
    }

    /// Records a snapshot taken locally at an applied index; the entries stay (the driver trims them).
    pub fn set_snapshot(&mut self, snap: Snapshot) {
        // Kept entries may start before the snapshot index; raft asks for a snapshot only for
        // entries before them.
        self.snapshot = snap;
    }
}

/// Shared handle to the in-memory log; raft holds one clone, the driver another.
#[derive(Clone, Default)]
pub struct LogStore {
    core: Arc<RwLock<Core>>,
}

impl LogStore {
    pub fn rl(&self) -> RwLockReadGuard<'_, Core> {
        self.core.read()
    }

    pub fn wl(&self) -> RwLockWriteGuard<'_, Core> {
        self.core.write()
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.rl();
        Ok(RaftState { hard_state: c.hard_state.clone(), conf_state: c.conf_state.clone() })
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, _ctx: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        let c = self.rl();
        let first = c.first_index();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - first) as usize;
        let hi = (high - first) as usize;
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(hi - lo);
        let mut size = 0u64;
        for e in &c.entries[lo..hi] {
            size += protobuf::Message::compute_size(e) as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.rl().term_of(idx).map_err(raft::Error::Store)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    /// A snapshot for a follower that is behind the log: taken at the applied index (with the
    /// configuration and application data as of that index), so that the backend sent along with
    /// it, read later at an index at least as new, covers it.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let c = self.rl();
        if c.applied_index < request_index || c.applied_index == 0 {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snapshot_at(c.applied_index, c.applied_term, c.applied_conf_state.clone(), c.app_data.clone()))
    }
}

/// A snapshot of the state at `index` (of `term`), with the configuration then and the
/// application's data.
pub fn snapshot_at(index: u64, term: u64, conf: ConfState, data: Vec<u8>) -> Snapshot {
    let mut snap = Snapshot::default();
    snap.set_data(data.into());
    let m = snap.mut_metadata();
    m.index = index;
    m.term = term;
    m.set_conf_state(conf);
    snap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    #[test]
    fn a_compacted_log_still_knows_the_term_before_its_first_entry() {
        let log = LogStore::default();
        log.wl().append(&(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>()).unwrap();
        assert_eq!(log.wl().compact(7), 6);
        assert_eq!((log.rl().first_index(), log.rl().last_index()), (7, 10));
        assert_eq!(log.term(6).unwrap(), 2, "the entry before the first one");
        assert!(matches!(log.term(5), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(log.entries(6, 8, None, GetEntriesContext::empty(false)), Err(raft::Error::Store(StorageError::Compacted))));
        assert_eq!(log.entries(7, 11, None, GetEntriesContext::empty(false)).unwrap().len(), 4);
        // Compacting no further than what is there, then everything.
        assert_eq!(log.wl().compact(3), 0);
        assert_eq!(log.wl().compact(100), 4);
        assert_eq!((log.rl().first_index(), log.rl().last_index()), (11, 10));
        assert_eq!(log.term(10).unwrap(), 3);
        log.wl().append(&[entry(11, 3)]).unwrap();
        assert_eq!((log.rl().first_index(), log.rl().last_index()), (11, 11));
    }
}

//! The raft log raft reads back (entries, terms, hard state, the latest snapshot). The WAL
//! makes it durable; this is rebuilt from the WAL at start.
//!
//! The newest entries are held in memory ("hot"); older applied ones, kept for followers that
//! fall behind, may be held only as their place in the WAL and their term ("cold",
//! [`Core::cool`]) and are read back from it when a follower asks for them, so the log's memory
//! is bounded in bytes whatever the entries' size (etcd keeps its last 5,000 entries whole:
//! 80 MB of 16 KiB values per member). An entry appended without its place (none is, but a
//! caller may) stays hot, and so does every entry after it.
//!
//! Unlike raft-rs's `MemStorage`, the snapshot kept here carries the application's data, so the
//! leader can send it to a follower that fell behind the compacted log.

use keel_wal::RecordAt;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use std::collections::VecDeque;
use std::sync::Arc;

/// An entry held only as its place in the WAL.
struct Cold {
    term: u64,
    at: RecordAt,
}

#[derive(Default)]
pub struct Core {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// The newest snapshot; its metadata marks where `entries` begin.
    pub snapshot: Snapshot,
    /// Entries held only as their place in the WAL, from `cold_first` on; the hot entries
    /// follow them without a gap.
    cold: VecDeque<Cold>,
    cold_first: u64,
    /// Entries in memory after the cold ones (or after the snapshot index or `compacted`),
    /// contiguous, and where in the WAL each went (None: not told).
    entries: Vec<Entry>,
    placed: Vec<Option<RecordAt>>,
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
        if !self.cold.is_empty() {
            return self.cold_first;
        }
        self.entries.first().map(|e| e.index).unwrap_or(self.snapshot.get_metadata().index.max(self.compacted.0) + 1)
    }

    /// The first entry held in memory (one past the last index when none is).
    pub fn hot_first(&self) -> u64 {
        self.entries.first().map(|e| e.index).unwrap_or(self.last_index() + 1)
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
        let hot = self.hot_first();
        if idx < hot {
            return Ok(self.cold[(idx - self.cold_first) as usize].term);
        }
        Ok(self.entries[(idx - hot) as usize].term)
    }

    /// Drops the entries before `keep_from` (at most those there are), remembering the last
    /// one's term. Returns how many were dropped.
    pub fn compact(&mut self, keep_from: u64) -> usize {
        let first = self.first_index();
        if keep_from <= first {
            return 0;
        }
        let mut n = (keep_from - first) as usize;
        let cold = n.min(self.cold.len());
        if let Some(last) = cold.checked_sub(1).and_then(|i| self.cold.get(i)) {
            self.compacted = (self.cold_first + cold as u64 - 1, last.term);
        }
        self.cold.drain(..cold);
        self.cold_first += cold as u64;
        n -= cold;
        let hot = n.min(self.entries.len());
        if let Some(last) = hot.checked_sub(1).and_then(|i| self.entries.get(i)) {
            self.compacted = (last.index, last.term);
        }
        self.entries.drain(..hot);
        self.placed.drain(..hot);
        cold + hot
    }

    /// Keeps in memory only the newest entries that fit in `budget` bytes of data, and every
    /// entry after `applied` (raft reads those back to apply them): older ones whose place in
    /// the WAL is known are dropped from memory and read back from the WAL when asked for.
    /// Returns how many went cold.
    pub fn cool(&mut self, budget: usize, applied: u64) -> usize {
        // Walked from the newest: the first applied entry past the budget and all before it
        // leave memory.
        let mut bytes = 0usize;
        let mut leaving = self.entries.len();
        while leaving > 0 {
            let e = &self.entries[leaving - 1];
            bytes += e.data.len() + e.context.len();
            if bytes > budget && e.index <= applied {
                break;
            }
            leaving -= 1;
        }
        // As far as their places are known.
        let n = self.placed[..leaving].iter().take_while(|p| p.is_some()).count();
        if n == 0 {
            return 0;
        }
        if self.cold.is_empty() {
            self.cold_first = self.entries[0].index;
        }
        for (e, at) in self.entries.drain(..n).zip(self.placed.drain(..n)) {
            if let Some(at) = at {
                self.cold.push_back(Cold { term: e.term, at });
            }
        }
        n
    }

    pub fn last_index(&self) -> u64 {
        if let Some(e) = self.entries.last() {
            return e.index;
        }
        if !self.cold.is_empty() {
            return self.cold_first + self.cold.len() as u64 - 1;
        }
        self.snapshot.get_metadata().index.max(self.compacted.0)
    }

    /// Appends entries, replacing any existing entries at or after the first new index; `placed`
    /// says where in the WAL each went (in order; empty when not known).
    pub fn append(&mut self, ents: &[Entry], placed: &[RecordAt]) -> Result<(), String> {
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
        let hot = self.hot_first();
        if first_new < hot {
            // Only committed entries go cold and those are never replaced; kept whole all the same.
            self.cold.truncate((first_new - self.cold_first) as usize);
            self.entries.clear();
            self.placed.clear();
        } else {
            self.entries.truncate((first_new - hot) as usize);
            self.placed.truncate((first_new - hot) as usize);
        }
        self.entries.extend_from_slice(ents);
        self.placed.extend((0..ents.len()).map(|i| placed.get(i).cloned()));
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
        self.cold.clear();
        self.entries.clear();
        self.placed.clear();
        self.compacted = (0, 0);
        self.snapshot = snap;
    }

    /// Records a snapshot taken locally at an applied index; the entries stay (the driver trims them).
    pub fn set_snapshot(&mut self, snap: Snapshot) {
        // Kept entries may start before the snapshot index; raft asks for a snapshot only for
        // entries before them.
        self.snapshot = snap;
    }

    /// Entry `idx`, which this log holds, from memory or read back from the WAL.
    fn entry(&self, idx: u64) -> Result<Entry, String> {
        let hot = self.hot_first();
        if idx >= hot {
            return Ok(self.entries[(idx - hot) as usize].clone());
        }
        let cold = &self.cold[(idx - self.cold_first) as usize];
        let data = cold.at.read().map_err(|e| e.to_string())?;
        let e = crate::wire::log_entry(&data).map_err(|e| e.to_string())?;
        if e.index != idx || e.term != cold.term {
            return Err(format!("the WAL holds entry {} of term {} where {idx} of term {} was written", e.index, e.term, cold.term));
        }
        Ok(e)
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
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for idx in low..high {
            let e = match c.entry(idx) {
                Ok(e) => e,
                Err(e) => {
                    // Raft sends a snapshot instead, as for entries compacted away.
                    tracing::warn!(index = idx, error = %e, "raft: cannot read back a log entry from the WAL");
                    return Err(raft::Error::Store(StorageError::Compacted));
                }
            };
            size += protobuf::Message::compute_size(&e) as u64;
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e);
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

    /// Entries written to a WAL in `dir`, 1..=n of 100 bytes each, and where each went.
    fn written(dir: &std::path::Path, n: u64) -> (Vec<Entry>, Vec<RecordAt>) {
        let mut wal = keel_wal::Wal::create(dir, b"meta", Default::default()).unwrap();
        let mut ents = Vec::new();
        let mut placed = Vec::new();
        for i in 1..=n {
            let e = Entry { index: i, term: 1 + i / 10, data: vec![i as u8; 100].into(), ..Default::default() };
            wal.save(&[(keel_wal::RECORD_ENTRY, &protobuf::Message::write_to_bytes(&e).unwrap())], i + 1).unwrap();
            placed.push(wal.placed()[0].clone());
            ents.push(e);
        }
        (ents, placed)
    }

    /// Cooling keeps the newest entries within the budget and every unapplied one in memory;
    /// the cold ones keep their terms and read back whole; compaction and a replaced tail work
    /// across the boundary.
    #[test]
    fn cold_entries_keep_their_terms_and_read_back_from_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (ents, placed) = written(dir.path(), 30);
        let log = LogStore::default();
        log.wl().append(&ents, &placed).unwrap();
        // 1,250 bytes: 21..=30 (not applied) and the newest two applied ones fit.
        assert_eq!(log.wl().cool(1250, 20), 18);
        assert_eq!((log.rl().first_index(), log.rl().hot_first(), log.rl().last_index()), (1, 19, 30));
        let got = log.entries(1, 31, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got, ents);
        for i in 1..=30 {
            assert_eq!(log.term(i).unwrap(), 1 + i / 10);
        }
        // The size limit counts read-back entries too: at least one, then as many as fit.
        assert_eq!(log.entries(3, 31, Some(1), GetEntriesContext::empty(false)).unwrap().len(), 1);
        // Nothing more goes cold while the budget holds, and entries without a place stay.
        assert_eq!(log.wl().cool(1250, 20), 0);
        assert_eq!(log.wl().compact(11), 10);
        assert_eq!((log.rl().first_index(), log.term(10).unwrap()), (11, 2));
        assert!(matches!(log.entries(10, 12, None, GetEntriesContext::empty(false)), Err(raft::Error::Store(StorageError::Compacted))));
        // A new leader's entries from 25 on replace the tail (in memory).
        let new_tail: Vec<Entry> = (25..=26).map(|i| entry(i, 9)).collect();
        log.wl().append(&new_tail, &[]).unwrap();
        assert_eq!(log.rl().last_index(), 26);
        assert_eq!(log.term(25).unwrap(), 9);
        assert_eq!(log.entries(11, 27, None, GetEntriesContext::empty(false)).unwrap()[..8], ents[10..18]);
        assert_eq!(log.wl().cool(0, 26), 6, "19..=24 had places; 25 and 26 have none");
        assert_eq!(log.rl().hot_first(), 25);
    }

    #[test]
    fn a_compacted_log_still_knows_the_term_before_its_first_entry() {
        let log = LogStore::default();
        log.wl().append(&(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>(), &[]).unwrap();
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
        log.wl().append(&[entry(11, 3)], &[]).unwrap();
        assert_eq!((log.rl().first_index(), log.rl().last_index()), (11, 11));
    }
}

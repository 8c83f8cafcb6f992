//! The store's key index, held one of two ways chosen when the store opens ([`IndexMode`]):
//! wholly in memory ([`Index`], rebuilt from the backend at every start), or kept in the backend
//! ([`Layers`] over table `key_by_key`), where memory holds only the histories changed since the
//! last merge and a start reads only the log written since it.
//!
//! Owns the index and, kept in the backend, its merges: once the changed histories pass the
//! budget they are frozen and written into `key_by_key` in parts of at most [`MERGE_PART_KEYS`] keys,
//! each riding one of the store's backend batches (same transaction, so the committer stays the
//! one writer); the last part drops the log rows the table now holds. Until a part is durable its
//! histories are read from the frozen layer. Calls index, layered and backend.

use crate::backend::{Backend, BackendError, Histories, IndexRow};
use crate::index::{Change, Index, KeyHistory, Visible};
use crate::layered::{IndexLog, Layer, Layers, MergePart};
use crate::revision::Revision;
use std::borrow::Cow;
use std::sync::Arc;

/// Most keys one merge part writes (one backend batch's share of a merge).
pub const MERGE_PART_KEYS: usize = 20_000;

/// Keys per transaction when [`KeyIndex::build_table`] writes a whole index.
const BUILD_PART_KEYS: usize = 50_000;

/// Least bytes of log a start replays before it merges them (each merge is durable
/// transactions of its own: a small budget must not make a start merge row by row).
const START_MERGE_BYTES: usize = 16 << 20;

/// Keys per merge part for a budget: a merge spans several batches, of at least 256 keys each
/// so that it keeps up with writes whatever the budget (a budget of 0, in tests, merges a key
/// per batch).
fn part_keys(budget: usize) -> usize {
    match budget {
        0 => 1,
        b => (b / 4096).clamp(256, MERGE_PART_KEYS),
    }
}

/// Where the store keeps its key index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexMode {
    /// All of it in memory, built from the backend's log at every start.
    #[default]
    Memory,
    /// In the backend; memory holds at most about `budget` bytes of changed histories (twice
    /// that while a merge writes them).
    Backend { budget: usize },
}

/// The index; see the module's documentation.
pub(crate) enum KeyIndex {
    /// All in memory; true when the file's index is kept as histories and a log (written with
    /// the index in the backend): the log's rows are then kept as [`IndexLog::keep_rows`] says.
    Memory(Index, bool),
    Backend(Box<Persisted>),
}

/// The index kept in the backend.
pub(crate) struct Persisted {
    layers: Layers,
    /// The committed histories, read from a read transaction taken after the last batch.
    base: Histories,
    budget: usize,
    merge: Option<Merge>,
}

/// A merge under way: the frozen layer and the key its next part starts at.
struct Merge {
    layer: Arc<Layer>,
    upto: i64,
    next: Option<Box<[u8]>>,
    /// The last part is durable but the base could not be read again yet.
    written: bool,
    started: std::time::Instant,
}

/// A key's state before a change, for [`KeyIndex::undo`].
pub(crate) enum Before {
    Memory(crate::index::Before),
    Backend(crate::layered::Before),
}

/// What opening the index found: the index, the newest revision its log holds and the bytes of
/// the records it stands for.
pub(crate) struct Opened {
    pub index: KeyIndex,
    pub last_main: i64,
    pub data_bytes: u64,
}

impl KeyIndex {
    /// Reads the index of `backend` the way `mode` keeps it. An index kept in the backend whose
    /// log is longer than the budget (and [`START_MERGE_BYTES`]) is merged as it is read (a file
    /// whose index was in memory: its whole log).
    pub(crate) fn open(backend: &Backend, mode: IndexMode) -> Result<Opened, BackendError> {
        backend.drop_stale_histories()?;
        let by_key = backend.by_key_meta()?;
        let budget = match mode {
            IndexMode::Memory if by_key.upto == 0 => return Self::open_in_memory(backend),
            IndexMode::Memory => usize::MAX,
            IndexMode::Backend { budget } => budget,
        };
        if by_key.upto == 0 && matches!(mode, IndexMode::Backend { .. }) {
            // A file whose index was all in memory (a learner's received backend, an etcd
            // import, an older Keel's, a first start with the flag): its histories are built in
            // memory once, from the log or the records, and written into the table in key order.
            Self::build_table(backend)?;
        }
        let by_key = backend.by_key_meta()?;
        let mut p =
            Persisted { layers: Layers::new(by_key.live as usize, by_key.total as usize), base: backend.histories()?, budget, merge: None };
        let (mut last_main, mut data_bytes) = (by_key.upto, by_key.bytes);
        backend.read_log(by_key.upto, |key, r| {
            if r.rev.main > last_main && p.layers.pending_bytes() > p.budget.max(START_MERGE_BYTES) {
                // Every row up to `last_main` is replayed: they can go.
                p.merge_now(backend, last_main)?;
            }
            last_main = last_main.max(r.rev.main);
            if p.layers.replay(&p.base, key, r.rev, r.tombstone, r.create_revision, r.version, r.lease, r.size)? {
                data_bytes += r.size as u64;
            }
            Ok(())
        })?;
        let index = match mode {
            IndexMode::Memory => {
                // The file's index was kept in the backend: this start holds all of it in memory.
                let all: Result<Vec<(Vec<u8>, KeyHistory)>, BackendError> = p.layers.range_all(&p.base, &[0], &[0])?.collect();
                KeyIndex::Memory(Index::from_sorted(all?), true)
            }
            IndexMode::Backend { .. } => KeyIndex::Backend(Box::new(p)),
        };
        Ok(Opened { index, last_main, data_bytes })
    }

    /// Builds table `key_by_key` of a file that has none: the whole index in memory once
    /// ([`Self::open_in_memory`]), written in key order in parts of [`BUILD_PART_KEYS`] keys,
    /// the last marking the log up to the newest revision merged.
    fn build_table(backend: &Backend) -> Result<(), BackendError> {
        let started = std::time::Instant::now();
        let Opened { index, last_main, .. } = Self::open_in_memory(backend)?;
        let KeyIndex::Memory(index, _) = index else { return Ok(()) };
        if last_main == 0 {
            return Ok(());
        }
        let mut all = index.range_all(&[0], &[0]).peekable();
        let mut part: Vec<(&[u8], Option<KeyHistory>)> = Vec::with_capacity(BUILD_PART_KEYS);
        loop {
            part.clear();
            part.extend(all.by_ref().take(BUILD_PART_KEYS).map(|(k, h)| (k, Some(h.clone()))));
            let last = all.peek().is_none();
            backend.merge_histories(part.iter().map(|(k, h)| (*k, h)), last.then_some(last_main))?;
            if last {
                break;
            }
        }
        tracing::info!(keys = index.len(), upto = last_main, took = ?started.elapsed(), "mvcc: built the table of key histories");
        Ok(())
    }

    fn open_in_memory(backend: &Backend) -> Result<Opened, BackendError> {
        let mut rows = Rows::default();
        let source = backend.read_index(&mut rows)?;
        tracing::debug!(key_index = source.name(), "mvcc: read the key index");
        let Rows { built, last_main, data_bytes } = rows;
        Ok(Opened { index: KeyIndex::Memory(built.finish(), false), last_main, data_bytes })
    }

    /// True when the index is kept in the backend.
    pub(crate) fn in_backend(&self) -> bool {
        matches!(self, KeyIndex::Backend(_))
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Cow<'_, KeyHistory>>, BackendError> {
        match self {
            KeyIndex::Memory(ix, _) => Ok(ix.get(key).map(Cow::Borrowed)),
            KeyIndex::Backend(p) => Ok(p.layers.get(&p.base, key)?.map(Cow::Owned)),
        }
    }

    pub(crate) fn put(&mut self, key: &[u8], rev: Revision, lease: i64, size: u32) -> Result<(), BackendError> {
        match self {
            KeyIndex::Memory(ix, _) => {
                ix.put(key, rev, lease, size);
                Ok(())
            }
            KeyIndex::Backend(p) => p.layers.put(&p.base, key, rev, lease, size),
        }
    }

    pub(crate) fn tombstone(&mut self, key: &[u8], rev: Revision, size: u32) -> Result<(), BackendError> {
        match self {
            KeyIndex::Memory(ix, _) => {
                ix.tombstone(key, rev, size);
                Ok(())
            }
            KeyIndex::Backend(p) => p.layers.tombstone(&p.base, key, rev, size),
        }
    }

    pub(crate) fn before(&self, key: &[u8]) -> Before {
        match self {
            KeyIndex::Memory(ix, _) => Before::Memory(ix.before(key)),
            KeyIndex::Backend(p) => Before::Backend(p.layers.before(key)),
        }
    }

    /// Takes back the newest change of `key`, made at `rev` after `before` was taken.
    pub(crate) fn undo(&mut self, key: &[u8], rev: Revision, before: Before) {
        match (self, before) {
            (KeyIndex::Memory(ix, _), Before::Memory(b)) => ix.undo(key, rev, b),
            (KeyIndex::Backend(p), Before::Backend(b)) => p.layers.undo(key, b),
            _ => debug_assert!(false, "undo with another index's state"),
        }
    }

    /// Calls `f` with every key in `[key, end)` and its history, in key order, while it returns
    /// true.
    pub(crate) fn walk<E: From<BackendError>>(
        &self,
        key: &[u8],
        end: &[u8],
        mut f: impl FnMut(&[u8], &KeyHistory) -> Result<bool, E>,
    ) -> Result<(), E> {
        match self {
            KeyIndex::Memory(ix, _) => {
                for (k, h) in ix.range_all(key, end) {
                    if !f(k, h)? {
                        break;
                    }
                }
            }
            KeyIndex::Backend(p) => {
                for e in p.layers.range_all(&p.base, key, end)? {
                    let (k, h) = e?;
                    if !f(&k, &h)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// What every key shows at `at` (see [`Visible`]), keeping revisions up to `upto`.
    pub(crate) fn visible_revisions(&self, at: i64, upto: i64) -> Result<Visible, BackendError> {
        match self {
            KeyIndex::Memory(ix, _) => Ok(ix.visible_revisions(at, upto)),
            KeyIndex::Backend(p) => p.layers.visible_revisions(&p.base, at, upto),
        }
    }

    /// See [`Index::compact_batch`].
    pub(crate) fn compact_batch(
        &mut self,
        at: i64,
        from: &[u8],
        limit: usize,
        dropped: &mut Vec<Change>,
        visible: Option<&mut Visible>,
    ) -> Result<Option<Vec<u8>>, BackendError> {
        match self {
            KeyIndex::Memory(ix, _) => Ok(ix.compact_batch(at, from, limit, dropped, visible)),
            KeyIndex::Backend(p) => p.layers.compact_batch(&p.base, at, from, limit, dropped, visible),
        }
    }

    pub(crate) fn live_count(&self) -> usize {
        match self {
            KeyIndex::Memory(ix, _) => ix.live_count(),
            KeyIndex::Backend(p) => p.layers.live_count(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            KeyIndex::Memory(ix, _) => ix.len(),
            KeyIndex::Backend(p) => p.layers.len(),
        }
    }

    /// True when the log's rows of deleted records are kept (see [`IndexLog::keep_rows`]).
    pub(crate) fn keeps_rows(&self) -> bool {
        match self {
            KeyIndex::Memory(_, log_form) => *log_form,
            KeyIndex::Backend(_) => true,
        }
    }

    /// True while a merge has parts left to write.
    pub(crate) fn merging(&self) -> bool {
        matches!(self, KeyIndex::Backend(p) if p.merge.as_ref().is_some_and(|m| !m.written))
    }

    /// What the next backend batch writes for the index: a merge's next part (a merge begins
    /// when the changed histories pass the budget; `current` is the revision everything applied
    /// so far is at, whose records are in that batch or before it).
    pub(crate) fn batch_log(&mut self, current: i64) -> IndexLog {
        let p = match self {
            KeyIndex::Memory(_, log_form) => return IndexLog { keep_rows: *log_form, ..IndexLog::default() },
            KeyIndex::Backend(p) => p,
        };
        if p.merge.is_none() && p.layers.pending_bytes() > p.budget {
            let layer = p.layers.take_batch();
            tracing::info!(keys = layer.len(), upto = current, "mvcc: merging the key index's changed histories into the backend");
            p.merge = Some(Merge { layer, upto: current, next: None, written: false, started: std::time::Instant::now() });
        }
        let parts = match &p.merge {
            Some(m) if !m.written => vec![MergePart::of(m.layer.clone(), m.next.clone(), part_keys(p.budget), m.upto)],
            _ => Vec::new(),
        };
        IndexLog { keep_rows: true, parts, ..IndexLog::default() }
    }

    /// A backend batch carrying `log` is durable in `backend`: the merge goes on after its
    /// parts, and the base is read again (a read transaction held from one batch to the next
    /// keeps the pages the batch freed from reuse).
    pub(crate) fn batch_written(&mut self, log: &IndexLog, backend: &Backend) {
        let KeyIndex::Backend(p) = self else { return };
        if let Some(m) = &mut p.merge {
            for part in &log.parts {
                m.next = part.next().map(Into::into);
                m.written |= part.upto().is_some();
            }
        }
        p.reread(backend);
    }

    /// The backend was replaced (a defragmentation's copy): the base is read from it.
    pub(crate) fn backend_replaced(&mut self, backend: &Backend) {
        if let KeyIndex::Backend(p) = self {
            p.reread(backend);
        }
    }
}

impl Persisted {
    /// Reads the base again; a merge whose last part is durable ends with it.
    fn reread(&mut self, backend: &Backend) {
        match backend.histories() {
            Ok(base) => {
                self.base = base;
                if let Some(m) = self.merge.take_if(|m| m.written) {
                    self.layers.finish_batch();
                    tracing::info!(keys = m.layer.len(), upto = m.upto, took = ?m.started.elapsed(), "mvcc: merged the key index's changed histories");
                }
            }
            // The old base and the frozen layer still answer; the next batch tries again.
            Err(e) => tracing::warn!(error = %e, "mvcc: cannot read the key index's histories again"),
        }
    }

    /// Merges everything the layers hold into the backend now, in parts of their own
    /// transactions (a start, before the store serves).
    fn merge_now(&mut self, backend: &Backend, upto: i64) -> Result<(), BackendError> {
        let layer = self.layers.take_batch();
        tracing::info!(keys = layer.len(), upto, "mvcc: merging the key index's log into the backend");
        let mut next: Option<Box<[u8]>> = None;
        loop {
            let part = MergePart::of(layer.clone(), next.take(), part_keys(self.budget), upto);
            backend.merge_histories(part.entries(), part.upto())?;
            match part.next() {
                Some(k) => next = Some(k.into()),
                None => break,
            }
        }
        self.base = backend.histories()?;
        self.layers.finish_batch();
        Ok(())
    }
}

/// Rows read at a start for an index all in memory.
#[derive(Default)]
struct Rows {
    built: crate::index::Builder,
    last_main: i64,
    data_bytes: u64,
}

impl crate::backend::IndexSink for Rows {
    fn reserve(&mut self, rows: usize) {
        self.built.reserve(rows);
    }

    fn row(&mut self, key: &[u8], r: IndexRow) {
        self.data_bytes += r.size as u64;
        self.last_main = self.last_main.max(r.rev.main);
        self.built.push(key.to_vec(), r.rev, r.tombstone, r.create_revision, r.version, r.lease, r.size);
    }

    fn clear(&mut self) {
        *self = Rows::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Fetch, Store};
    use std::path::Path;

    /// Merges at every batch, a key per part: a merge spans many batches.
    const TINY: IndexMode = IndexMode::Backend { budget: 0 };
    const MODES: [IndexMode; 3] = [IndexMode::Memory, TINY, IndexMode::Backend { budget: 1 << 20 }];

    /// Writes, deletes and compacts, committing every second change; returns after the
    /// `commits`-th commit (or at the end).
    fn script(s: &mut Store, commits: usize) {
        let mut done = 0;
        for i in 0..60i64 {
            let mut w = s.write();
            if i % 5 == 4 {
                let k = [b'k', (i % 7) as u8];
                w.delete_range(&k, &[], false).unwrap();
            } else {
                w.put(&[b'k', (i % 13) as u8], Some(format!("v{i}").as_bytes()), None, false).unwrap();
            }
            w.finish();
            if i == 30 {
                s.compact(s.current_rev() - 5).unwrap();
            }
            s.compact_step();
            if i % 2 == 1 {
                s.commit().unwrap();
                done += 1;
                if done == commits {
                    return;
                }
            }
        }
    }

    /// What a store serves: every key-value now, its counts and sizes (its resumed compaction
    /// run first).
    fn seen(s: &mut Store) -> (i64, usize, usize, u64, Vec<keel_proto::mvccpb::KeyValue>) {
        while s.compacting() {
            s.compact_step();
        }
        let cur = s.current_rev();
        let (kvs, _) = s.range_at(&[0], &[0], cur, 0, Fetch::Values).unwrap();
        (cur, s.live_key_count(), s.key_count(), s.data_size(), kvs)
    }

    /// The child half of [`a_crash_during_a_merge_loses_nothing`]: the script up to commit
    /// `KEEL_MERGE_CRASH_AFTER`, then death without a clean shutdown.
    #[test]
    fn merge_crash_child() {
        let (Ok(path), Ok(n)) = (std::env::var("KEEL_MERGE_CRASH_DB"), std::env::var("KEEL_MERGE_CRASH_AFTER")) else { return };
        let mut s = Store::open_with(Path::new(&path), TINY).unwrap();
        script(&mut s, n.parse().unwrap());
        std::process::abort();
    }

    /// A member killed between any two batches of a merge of its key index (some parts in the
    /// table, the log not yet trimmed) restarts, in any mode, with what it had committed: what a
    /// store that ran the same changes and closed cleanly serves.
    #[test]
    fn a_crash_during_a_merge_loses_nothing() {
        for commits in 1..=30 {
            let d = tempfile::tempdir().unwrap();
            let crashed = d.path().join("crashed");
            let st = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "keyindex::tests::merge_crash_child", "--nocapture", "--test-threads=1"])
                .env("KEEL_MERGE_CRASH_DB", &crashed)
                .env("KEEL_MERGE_CRASH_AFTER", commits.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(!st.success(), "the child must die without a clean shutdown");
            let model = {
                let mut s = Store::open_with(&d.path().join("model"), IndexMode::Memory).unwrap();
                script(&mut s, commits);
                seen(&mut s)
            };
            for (i, mode) in MODES.iter().enumerate() {
                let copy = d.path().join(format!("copy{i}"));
                std::fs::copy(&crashed, &copy).unwrap();
                let mut s = Store::open_with(&copy, *mode).unwrap();
                assert_eq!(seen(&mut s), model, "after commit {commits}, reopened as {mode:?}");
                // And once more, after a clean close in that mode.
                drop(s);
                let mut s = Store::open_with(&copy, TINY).unwrap();
                assert_eq!(seen(&mut s), model, "after commit {commits}, reopened as {mode:?} then with the index in the backend");
            }
        }
    }

    /// A file whose log an older Keel made whole again after a merge (it knows no table of
    /// histories, and drops log rows with their records) is read from its log: the stale
    /// table is dropped.
    #[test]
    fn a_stale_table_of_histories_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let mut s = Store::open_with(&path, TINY).unwrap();
        let mut w = s.write();
        w.put(b"a", Some(b"1"), None, false).unwrap();
        w.finish();
        s.commit().unwrap();
        s.commit().unwrap();
        assert!(s.backend().by_key_meta().unwrap().upto > 0, "the merge completed");
        drop(s);
        // The older Keel: the key deleted and compacted away, its rows gone with its records,
        // the log marked whole.
        {
            let b = Backend::open(&path).unwrap();
            let mut changes = crate::backend::Changes::new();
            changes.insert(Revision::new(2, 0).to_key(false), None);
            b.commit(
                &changes,
                &Default::default(),
                &crate::backend::Meta { consistent_index: 0, term: 0, current_rev: 3, compacted_rev: 3 },
            )
            .unwrap();
            b.mark_log_complete_for_test();
        }
        for mode in MODES {
            let copy = d.path().join(format!("{mode:?}"));
            std::fs::copy(&path, &copy).unwrap();
            let mut s = Store::open_with(&copy, mode).unwrap();
            assert_eq!(seen(&mut s).4, vec![], "as {mode:?}");
        }
    }
}

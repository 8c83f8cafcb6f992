//! The store: index + backend + the batch of changes not yet committed to the backend.
//!
//! Writers (the apply path) hold `&mut Store`; readers hold `&Store`. [`crate::shared`] puts the
//! store behind a lock, so a write transaction is atomic to readers, and keeps the lock short:
//! a backend commit takes the batch out ([`Store::take_batch`]), writes it without the lock and
//! hands it back ([`Store::finish_batch`]); while it is written readers find its values in the
//! batch. Reads that touch many keys are *planned* under the lock (index walk, values of
//! unflushed revisions, a redb read transaction, all at one instant) and loaded after it.

use crate::backend::{Backend, BackendError, Meta, Reader};
use crate::error::KvError;
use crate::index::{Change, KeyHistory};
use crate::keyindex::{IndexMode, KeyIndex};
use crate::layered::IndexLog;
use crate::revision::Revision;
use keel_proto::mvccpb::{event::EventType, Event, KeyValue};
use prost::Message;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// etcd's backend batching: commit every 100 ms or 10,000 changes, whichever comes first.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);
pub const BATCH_LIMIT: usize = 10_000;
/// How often, at most, a batch is made durable by default ([`Store::set_sync_interval`]):
/// batches taken sooner after a durable one (the batch limit reached under a heavy load) are
/// only made visible ([`CommitMode::Visible`]), which writes no allocator state and syncs nothing,
/// and the next batch is durable. A crash loses at most the batches since the last durable
/// one, which the WAL replays at start (it keeps every entry past the backend's durable index:
/// [`Store::committed_index`]). Not longer: a second (PERFORMANCE.md run 14) left ten batches'
/// pages to one sync, and the WALs' fsyncs on the same disk waited behind it (one run: put p99
/// 4.1 -> 5.2 ms with 1 client, 41 -> 86 ms with 100).
pub const SYNC_INTERVAL: Duration = BATCH_INTERVAL;

pub use crate::backend::{Changes, CommitMode};

/// One batch of changes on its way to the backend, with the meta record it ends at.
#[derive(Debug, Default)]
pub struct Batch {
    pub changes: Changes,
    pub aux: BTreeMap<String, Vec<u8>>,
    pub meta: Meta,
    /// What the batch writes for an index kept in the backend.
    pub log: IndexLog,
    /// Whether its commit is durable (and with it every commit before it).
    pub sync: CommitMode,
}

impl Batch {
    /// Writes the batch to `backend` in one transaction, durably or not as [`Batch::sync`] says.
    pub fn write_to(&self, backend: &Backend) -> Result<(), BackendError> {
        backend.commit_with(&self.changes, &self.aux, &self.meta, &self.log, self.sync)
    }
}

pub struct Store {
    backend: Backend,
    index: KeyIndex,
    /// Changes not yet in the backend.
    pending: Changes,
    /// Records a compaction dropped before any batch wrote them, whose log rows the next batch
    /// writes (an index kept as a log: see [`IndexLog::rows`]).
    log_only: Changes,
    /// The batch being written to the backend right now (readers find its values here).
    committing: Option<Arc<Batch>>,
    /// Auxiliary records (other modules' state), all of them; `aux_dirty` are not yet committed.
    aux: BTreeMap<String, Vec<u8>>,
    aux_dirty: BTreeMap<String, Vec<u8>>,
    /// Bytes of the auxiliary records (names and values), kept as they change: the quota check
    /// reads it on every write, and there is one record per lease.
    aux_bytes: u64,
    /// The backend's pages in use when last counted, and [`Store::data_size`] then: what is in
    /// use now is estimated from them ([`Store::db_size_in_use`]). None until counted (a walk
    /// of the whole file: not at open, where it would lengthen every restart).
    in_use_base: Option<(u64, u64)>,
    meta: Meta,
    /// The meta record of the last batch written to the backend (durable or not).
    committed: Meta,
    /// The consistent index of the last durable batch.
    durable_index: u64,
    /// A batch was written without being made durable since the last durable one.
    unsynced: bool,
    /// Someone waits for the next batch to be durable ([`Store::want_sync`]).
    sync_wanted: bool,
    /// Durable batches written by this store so far (see [`Store::durable_mark`]).
    committed_batches: u64,
    /// Fill in prev_kv on every event (some watcher asked for it).
    events_with_prev: bool,
    /// When the last batch was taken: the batch interval is timed from it.
    last_commit: Instant,
    /// When the last durable batch was taken: a durable one is owed `sync_interval` after it.
    last_sync: Instant,
    sync_interval: Duration,
    /// Set while a defragmentation copies the backend: the batches committed since it began.
    defrag: Option<DefragTail>,
    /// Bytes of the key table's records (keys and values) that the backend holds or will hold.
    data_bytes: u64,
    /// A compaction under way: its revision and the key its next batch starts at.
    compacting: Option<(i64, Vec<u8>)>,
    /// The hash of the key space at the compaction under way's revision (etcd's compaction
    /// hash): planned on the backend as the compaction began, the revisions it keeps collected
    /// by the compaction's batches (a walk of every key at once, under the lock, held every
    /// member's applies 16 s at 5 GB).
    compaction_hash: Option<(HashPlan, crate::index::Visible)>,
    /// The hash of the compaction that finished, ready to run (see [`Store::take_compaction_hash`]).
    finished_hash: Option<HashPlan>,
}

/// Keys whose histories one compaction batch goes through (etcd's compaction batch limit).
pub const COMPACTION_BATCH: usize = 1000;

/// Most records a defragmentation buffers from concurrent commits before it gives up.
const DEFRAG_TAIL_LIMIT: usize = 2_000_000;
const DEFRAG_OVERFLOW: &str = "too many writes during defragmentation; try again when the load is lower";
const DEFRAG_INTERRUPTED: &str = "defragmentation was interrupted (the backend was replaced)";

#[derive(Default)]
struct DefragTail {
    /// [`Store::data_size`] when the copy began: the copy's pages in use hold that much data.
    data_at_begin: u64,
    changes: Changes,
    aux: BTreeMap<String, Vec<u8>>,
    meta: Option<Meta>,
    /// Merge parts of the index kept in the backend, oldest first.
    parts: Vec<crate::layered::MergePart>,
    rows: Changes,
    overflowed: bool,
}

/// Where a defragmentation writes its copy of the backend at `db`.
/// What one auxiliary record counts against the quota.
fn aux_size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

pub fn defrag_path(db: &Path) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".defrag");
    p.into()
}

fn decode_kv(bytes: &[u8]) -> Result<KeyValue, KvError> {
    KeyValue::decode(bytes).map_err(|e| KvError::Corrupt(format!("undecodable key-value record: {e}")))
}

impl Store {
    /// Opens the backend at `path` and loads the index from it, all in memory (see
    /// [`Backend::read_index`]).
    pub fn open(path: &Path) -> Result<Store, BackendError> {
        Self::open_with(path, IndexMode::Memory)
    }

    /// Opens the backend at `path` with its key index kept as `mode` says.
    pub fn open_with(path: &Path, mode: IndexMode) -> Result<Store, BackendError> {
        // A defragmentation that did not finish leaves its partial copy behind.
        let _ = keel_reclaim::remove(&defrag_path(path));
        let backend = Backend::open(path)?;
        let mut meta = backend.read_meta()?;
        let crate::keyindex::Opened { index, last_main, data_bytes } = KeyIndex::open(&backend, mode)?;
        meta.current_rev = meta.current_rev.max(last_main).max(meta.compacted_rev);
        if meta.current_rev == 0 {
            // etcd starts at revision 1: the empty store.
            meta.current_rev = 1;
        }
        tracing::info!(
            consistent_index = meta.consistent_index,
            current_revision = meta.current_rev,
            compacted_revision = meta.compacted_rev,
            keys = index.len(),
            full_repair = backend.repaired(),
            key_index_in_backend = index.in_backend(),
            "mvcc: restored store"
        );
        let aux = backend.read_aux()?;
        let aux_bytes: u64 = aux.iter().map(|(k, v)| aux_size(k, v)).sum();
        Ok(Store {
            backend,
            index,
            pending: BTreeMap::new(),
            log_only: BTreeMap::new(),
            committing: None,
            aux,
            aux_dirty: BTreeMap::new(),
            aux_bytes,
            in_use_base: None,
            committed: meta,
            durable_index: meta.consistent_index,
            unsynced: false,
            sync_wanted: false,
            committed_batches: 0,
            meta,
            events_with_prev: false,
            last_commit: Instant::now(),
            last_sync: Instant::now(),
            sync_interval: SYNC_INTERVAL,
            defrag: None,
            data_bytes,
            // A compaction a crash interrupted (or one at the last start) goes on from the start:
            // its batches are idempotent.
            compacting: (meta.compacted_rev > 0).then(|| (meta.compacted_rev, Vec::new())),
            compaction_hash: None,
            finished_hash: None,
        })
    }

    pub fn current_rev(&self) -> i64 {
        self.meta.current_rev
    }

    pub fn compacted_rev(&self) -> i64 {
        self.meta.compacted_rev
    }

    /// Index of the last raft entry applied to this store (committed or not).
    pub fn consistent_index(&self) -> u64 {
        self.meta.consistent_index
    }

    /// Term of the entry at [`Store::consistent_index`].
    pub fn consistent_term(&self) -> u64 {
        self.meta.term
    }

    /// Index of the last raft entry whose effects are durable in the backend.
    pub fn committed_index(&self) -> u64 {
        self.durable_index
    }

    /// Records that raft entry `index` (of `term`) has been applied.
    pub fn set_consistent_index(&mut self, index: u64, term: u64) {
        debug_assert!(index >= self.meta.consistent_index, "consistent index must not go back");
        self.meta.consistent_index = index;
        self.meta.term = term;
    }

    /// Moves the current revision `amount` ahead with no change at the revisions passed over
    /// (etcdutl's `snapshot restore --bump-revision`); returns the new current revision.
    /// Offline use only.
    pub fn bump_revision(&mut self, amount: i64) -> i64 {
        self.meta.current_rev += amount.max(0);
        self.meta.current_rev
    }

    /// Forgets which raft entries the backend holds (restoring a snapshot into a new cluster,
    /// whose log starts over). Offline use only.
    pub fn reset_consistent_index(&mut self) {
        self.meta.consistent_index = 0;
        self.meta.term = 0;
    }

    /// Changes applied but not yet handed to a backend commit.
    pub fn pending_changes(&self) -> usize {
        self.pending.len()
    }

    /// True when a batch is due: old enough or large enough, or a durable one owed.
    pub fn commit_due(&self) -> bool {
        self.pending.len() >= BATCH_LIMIT
            || (self.changed() && self.last_commit.elapsed() >= BATCH_INTERVAL)
            || (self.unsynced && self.last_sync.elapsed() >= self.sync_interval)
            || (self.sync_wanted && self.dirty())
    }

    /// How long after a durable batch the next one is owed (default [`SYNC_INTERVAL`]).
    pub fn set_sync_interval(&mut self, every: Duration) {
        self.sync_interval = every;
    }

    /// Asks for the next batch to be durable, and due at once: for a waiter on
    /// [`Store::durable_mark`] (a finished compaction).
    pub fn want_sync(&mut self) {
        self.sync_wanted = true;
    }

    /// The next batch is to be durable: something is not, and the last durable batch is
    /// [`Store::set_sync_interval`] old or a waiter asked.
    fn sync_owed(&self) -> bool {
        self.dirty() && (self.sync_wanted || self.last_sync.elapsed() >= self.sync_interval)
    }

    /// Anything not yet durable: changed since the last batch was taken, or written by a batch
    /// that was not made durable.
    fn dirty(&self) -> bool {
        self.unsynced || self.changed()
    }

    /// Anything applied, dropped or set since the last batch was taken (a compaction's
    /// deletions alone count: they are due after a batch interval like any change).
    fn changed(&self) -> bool {
        !self.pending.is_empty()
            || !self.aux_dirty.is_empty()
            || self.meta != self.committed
            || self.index.merging()
            || !self.log_only.is_empty()
    }

    /// Batches made durable so far; everything applied and dropped before
    /// [`Store::durable_mark`] answered is durable once this reaches it.
    pub fn committed_batches(&self) -> u64 {
        self.committed_batches
    }

    /// The [`Store::committed_batches`] at which everything changed so far is durable: after the
    /// batch being committed (if it is a durable one) and the next durable one (if anything is
    /// pending or only visible). Never early: a failed commit puts its changes back, and only a
    /// later batch counts.
    pub fn durable_mark(&self) -> u64 {
        let in_flight = self.committing.as_ref().map(|b| b.sync);
        let durable_in_flight = in_flight == Some(CommitMode::Durable);
        let visible_in_flight = in_flight == Some(CommitMode::Visible);
        self.committed_batches + u64::from(durable_in_flight) + u64::from(self.dirty() || visible_in_flight)
    }

    /// Commits the pending batch to the backend now (durably), holding `&mut self` throughout.
    /// For single-threaded use (start, offline tools); a shared store commits through
    /// [`crate::shared::SharedStore::commit`], which does not hold the lock while writing.
    pub fn commit(&mut self) -> Result<(), BackendError> {
        let Some((batch, backend)) = self.take_batch(CommitMode::Durable) else { return Ok(()) };
        match batch.write_to(&backend) {
            Ok(()) => {
                self.finish_batch(&batch);
                Ok(())
            }
            Err(e) => {
                self.abort_batch(batch);
                Err(e)
            }
        }
    }

    /// Takes the pending batch out for a commit, with the backend to write it to; `None` when
    /// there is nothing to commit. Until [`Store::finish_batch`] (or [`Store::abort_batch`]),
    /// reads find the batch's values in it. One batch at a time (the caller serializes commits).
    ///
    /// `at_least` [`CommitMode::Visible`]: the batch is made durable only when one is owed (the last
    /// durable one is [`SYNC_INTERVAL`] old, or [`Store::want_sync`] asked); an empty durable
    /// batch when only that is left to do.
    pub fn take_batch(&mut self, at_least: CommitMode) -> Option<(Arc<Batch>, Backend)> {
        self.last_commit = Instant::now();
        assert!(self.committing.is_none(), "mvcc: a backend commit is already in progress");
        let sync = if at_least == CommitMode::Durable || self.sync_owed() { CommitMode::Durable } else { CommitMode::Visible };
        let due = match sync {
            CommitMode::Durable => self.dirty(),
            CommitMode::Visible => self.changed(),
        };
        if !due {
            return None;
        }
        if sync == CommitMode::Durable {
            // Put back if the commit fails (abort_batch).
            self.unsynced = false;
            self.sync_wanted = false;
            // The interval runs from this batch's take, on the batch interval's clock: timed
            // from its end, the next batch taken a batch interval later would be found early
            // and only made visible, every other batch.
            self.last_sync = self.last_commit;
        }
        let mut log = self.index.batch_log(self.meta.current_rev);
        log.rows = std::mem::take(&mut self.log_only);
        let batch = Arc::new(Batch {
            changes: std::mem::take(&mut self.pending),
            aux: std::mem::take(&mut self.aux_dirty),
            meta: self.meta,
            log,
            sync,
        });
        self.committing = Some(batch.clone());
        Some((batch, self.backend.clone()))
    }

    /// The batch taken by [`Store::take_batch`] is durable in the backend.
    pub fn finish_batch(&mut self, batch: &Arc<Batch>) {
        debug_assert!(self.committing.as_ref().map(|c| Arc::ptr_eq(c, batch)).unwrap_or(false));
        self.committing = None;
        self.committed = batch.meta;
        match batch.sync {
            CommitMode::Durable => {
                self.durable_index = batch.meta.consistent_index;
                self.committed_batches += 1;
            }
            CommitMode::Visible => self.unsynced = true,
        }
        self.index.batch_written(&batch.log, &self.backend);
        if let Some(tail) = &mut self.defrag {
            if !tail.overflowed {
                if batch.log.keep_rows {
                    // A record an earlier batch of the tail wrote and this one removes (a
                    // compaction) never reaches the copy, but its log row must: a kept row of a
                    // deleted record (a tombstone's above all) is what tells a start the key's
                    // history moved on.
                    for (k, v) in &batch.changes {
                        if let (None, Some(Some(written))) = (v, tail.changes.get(k)) {
                            tail.rows.insert(k.clone(), Some(written.clone()));
                        }
                    }
                }
                tail.changes.extend(batch.changes.iter().map(|(k, v)| (k.clone(), v.clone())));
                tail.aux.extend(batch.aux.iter().map(|(k, v)| (k.clone(), v.clone())));
                tail.parts.extend(batch.log.parts.iter().cloned());
                tail.rows.extend(batch.log.rows.iter().map(|(k, v)| (k.clone(), v.clone())));
                tail.meta = Some(batch.meta);
                if tail.changes.len() + tail.aux.len() > DEFRAG_TAIL_LIMIT {
                    tail.overflowed = true;
                    tail.changes.clear();
                    tail.aux.clear();
                    tail.parts.clear();
                    tail.rows.clear();
                }
            }
        }
    }

    /// The commit of `batch` failed: its changes go back in front of the pending ones (which
    /// are newer), to be committed with them next time.
    pub fn abort_batch(&mut self, batch: Arc<Batch>) {
        self.committing = None;
        if batch.sync == CommitMode::Durable {
            // What the visible batches before it wrote is still not durable, and whoever
            // waited for it still waits.
            self.unsynced = true;
            self.sync_wanted = true;
        }
        // Its merge part (if any) is not lost: the merge goes on from where its last durable
        // part ended.
        let batch = Arc::try_unwrap(batch).unwrap_or_else(|b| Batch {
            changes: b.changes.clone(),
            aux: b.aux.clone(),
            meta: b.meta,
            log: IndexLog { rows: b.log.rows.clone(), ..IndexLog::default() },
            sync: b.sync,
        });
        let mut rows = batch.log.rows;
        rows.extend(std::mem::take(&mut self.log_only));
        self.log_only = rows;
        let mut changes = batch.changes;
        changes.extend(std::mem::take(&mut self.pending));
        self.pending = changes;
        let mut aux = batch.aux;
        aux.extend(std::mem::take(&mut self.aux_dirty));
        self.aux_dirty = aux;
    }

    /// The value of a revision key not yet in the backend (pending or being committed), if it
    /// is one: `Some(None)` when it is marked deleted.
    fn unflushed(&self, rev: Revision, key: &[u8]) -> Option<Option<&Arc<[u8]>>> {
        if rev.main <= self.committed.current_rev {
            return None;
        }
        if let Some(v) = self.pending.get(key) {
            return Some(v.as_ref());
        }
        self.committing.as_ref().and_then(|b| b.changes.get(key)).map(|v| v.as_ref())
    }

    /// Sets an auxiliary record; committed with the current batch (so atomically with the
    /// consistent index of the entry that set it).
    pub fn set_aux(&mut self, key: &str, value: Vec<u8>) {
        self.aux_bytes += aux_size(key, &value);
        if let Some(old) = self.aux.insert(key.to_string(), value.clone()) {
            self.aux_bytes -= aux_size(key, &old);
        }
        self.aux_dirty.insert(key.to_string(), value);
    }

    /// Removes an auxiliary record (with the current batch).
    pub fn delete_aux(&mut self, key: &str) {
        if let Some(old) = self.aux.remove(key) {
            self.aux_bytes -= aux_size(key, &old);
        }
        self.aux_dirty.insert(key.to_string(), Vec::new());
    }

    /// Auxiliary records whose names start with `prefix`.
    pub fn aux_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.aux.range(prefix.to_string()..).take_while(move |(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Live keys that are attached to a lease, with the lease.
    pub fn leased_keys(&self) -> Result<Vec<(Vec<u8>, i64)>, BackendError> {
        let mut out = Vec::new();
        self.index.walk(&[0], &[0], |k, h| {
            if h.is_live() && h.lease != 0 {
                out.push((k.to_vec(), h.lease));
            }
            Ok::<_, BackendError>(true)
        })?;
        Ok(out)
    }

    pub fn aux(&self, key: &str) -> Option<&[u8]> {
        self.aux.get(key).map(|v| v.as_slice())
    }

    /// A handle to the backend for reading its committed state from another thread (call
    /// [`Store::commit`] first to include everything applied).
    pub fn backend(&self) -> Backend {
        self.backend.clone()
    }

    /// Starts a defragmentation: returns the backend to copy (with [`Backend::copy_to`], without
    /// holding the store) while commits go on and are remembered from now on. Call with no
    /// commit in progress. Nothing is committed here: the pending batch is remembered when it is
    /// committed, and a batch both in the copy and remembered is written to the copy twice,
    /// which changes nothing (a record's revision key names one value).
    pub fn begin_defrag(&mut self) -> Result<Backend, BackendError> {
        debug_assert!(self.committing.is_none(), "a defragmentation begins with no commit in progress");
        if self.defrag.is_some() {
            return Err(BackendError { path: self.backend.path().to_path_buf(), msg: "a defragmentation is already running".into() });
        }
        self.defrag = Some(DefragTail { data_at_begin: self.data_size(), ..Default::default() });
        Ok(self.backend.clone())
    }

    /// The batches committed since the defragmentation began, or since the last call, to be
    /// written to the copy without holding the store ([`Backend::commit`]); `None` when there
    /// are none. Keeps what [`Store::finish_defrag`] must still write (and the store held
    /// meanwhile) small.
    pub fn take_defrag_tail(&mut self) -> Result<Option<Batch>, BackendError> {
        let fail = |msg: &str| BackendError { path: self.backend.path().to_path_buf(), msg: msg.to_string() };
        let keep_rows = self.index.keeps_rows();
        match &mut self.defrag {
            Some(t) if t.overflowed => Err(fail(DEFRAG_OVERFLOW)),
            Some(t) => Ok(t.meta.take().map(|meta| Batch {
                changes: std::mem::take(&mut t.changes),
                aux: std::mem::take(&mut t.aux),
                meta,
                log: IndexLog { keep_rows, parts: std::mem::take(&mut t.parts), rows: std::mem::take(&mut t.rows) },
                // The copy takes the backend's place: it must hold durably all the backend held.
                sync: CommitMode::Durable,
            })),
            None => Err(fail(DEFRAG_INTERRUPTED)),
        }
    }

    /// Ends a defragmentation: the batches committed since it began (or since the last
    /// [`Store::take_defrag_tail`]) are written to `copy`, which then replaces the backend file;
    /// the pending batch is committed to it later, as any other. Call with no commit in
    /// progress. `copy_in_use`: the copy's pages in use before the remembered batches
    /// ([`Backend::pages_in_use`], counted by the caller without holding the store). Returns how
    /// many records were written here, and the old backend: dropping it closes the old file,
    /// which takes a while for a big one, so the caller should drop it without holding the
    /// store. On error the old backend stays in use.
    pub fn finish_defrag(&mut self, copy: Backend, copy_in_use: u64) -> Result<(usize, Backend), BackendError> {
        // Whatever happens next, the defragmentation is over: nothing more is remembered.
        let rest = self.take_defrag_tail();
        let data_at_begin = self.defrag.take().map_or(0, |t| t.data_at_begin);
        let mut replayed = 0;
        if let Some(b) = rest? {
            replayed = b.changes.len() + b.aux.len();
            b.write_to(&copy)?;
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("mvcc::defrag", |_| std::process::abort());
        // The old file's blocks go back in steps once nothing reads it any more.
        self.backend.retire();
        let new = copy.rename_to(self.backend.path())?;
        let old = std::mem::replace(&mut self.backend, new);
        self.index.backend_replaced(&self.backend);
        self.in_use_base = Some((copy_in_use, data_at_begin));
        Ok((replayed, old))
    }

    /// Marks the backend's file as about to be replaced by another store's
    /// ([`Store::move_to`]): its blocks go back in steps once this store and its readers are
    /// gone ([`Backend::retire`]).
    pub fn retire_backend(&self) {
        self.backend.retire();
    }

    /// Moves the backend file to `dest` (an atomic rename over whatever is there) and keeps
    /// using it: a backend received from the leader taking the member's backend's place.
    pub fn move_to(&mut self, dest: &Path) -> Result<(), BackendError> {
        self.backend = self.backend.clone().rename_to(dest)?;
        Ok(())
    }

    /// The backend's bytes in use (etcd's `dbSizeInUse`): its pages in use when they were last
    /// counted ([`Store::set_pages_in_use`], and after a defragmentation), moved by the data
    /// written or compacted away since; at most the file's size. A compaction makes it fall and
    /// the file does not shrink: the difference is what a defragmentation would give back, as on
    /// etcd. Before the first count: the data's bytes.
    pub fn db_size_in_use(&self) -> u64 {
        let now = match self.in_use_base {
            Some((pages, data)) => (pages as i128 + self.data_size() as i128 - data as i128).max(0) as u64,
            None => self.data_size(),
        };
        now.min(self.db_size())
    }

    /// Records the backend's pages in use, `pages`, counted ([`Backend::pages_in_use`], without
    /// holding the store) when the data's size was `data`; unless a defragmentation counted
    /// them since.
    pub fn set_pages_in_use(&mut self, pages: u64, data: u64) {
        self.in_use_base.get_or_insert((pages, data));
    }

    /// Abandons a defragmentation (the copy failed).
    pub fn abort_defrag(&mut self) {
        self.defrag = None;
    }

    /// Bytes of the backend file physically allocated ([`Backend::size`]; what the data needs:
    /// [`Store::data_size`]).
    pub fn db_size(&self) -> u64 {
        self.backend.size()
    }

    /// The space the data needs: key records (all revisions not compacted) and auxiliary
    /// records, in bytes. What the quota is measured against (the file itself may be larger:
    /// redb preallocates and keeps freed pages until a defragmentation).
    pub fn data_size(&self) -> u64 {
        self.data_bytes + self.aux_bytes
    }

    /// Number of live keys.
    pub fn live_key_count(&self) -> usize {
        self.index.live_count()
    }

    /// Number of keys held by the index (live or with history).
    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    fn fetch(&self, reader: &mut Option<Reader>, rev: Revision) -> Result<KeyValue, KvError> {
        let k = rev.to_key(false);
        if let Some(v) = self.unflushed(rev, &k) {
            return match v {
                Some(v) => decode_kv(v),
                None => Err(KvError::Corrupt(format!("revision {rev:?} is deleted but still indexed"))),
            };
        }
        if reader.is_none() {
            *reader = Some(self.backend.reader().map_err(KvError::Backend)?);
        }
        let r = reader.as_ref().ok_or_else(|| KvError::Corrupt("no reader".into()))?;
        match r.get(&k).map_err(KvError::Backend)? {
            Some(v) => decode_kv(&v),
            None => Err(KvError::Corrupt(format!("revision {rev:?} is indexed but missing from the backend"))),
        }
    }

    /// Where the value of `rev` is, as of now: its record if not yet in the backend, else its
    /// key in the backend (read later through the plan's reader).
    fn slot(&self, rev: Revision) -> Result<Slot, KvError> {
        let k = rev.to_key(false);
        match self.unflushed(rev, &k) {
            Some(Some(v)) => Ok(Slot::Record(v.clone())),
            Some(None) => Err(KvError::Corrupt(format!("revision {rev:?} is deleted but still indexed"))),
            None => Ok(Slot::Stored(k)),
        }
    }

    /// Plans a read of the keys in `[key, end)` at revision `at` (already validated): up to
    /// `limit` key-values (0: all) as `fetch` says, and the number of keys in the range.
    /// Cheap (an index walk); [`ReadPlan::load`] then reads the values without the store.
    pub fn plan_range(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(ReadPlan, i64), KvError> {
        let (plan, count, _) = self.plan(key, end, at, limit, fetch, true)?;
        Ok((plan, count))
    }

    /// One page of a streamed range: up to `limit` (at least 1) key-values of `[key, end)` at
    /// `at` (already validated), and whether more keys follow. The keys after the page are not
    /// counted (see [`Store::count_at`]).
    pub fn plan_page(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(ReadPlan, bool), KvError> {
        let (plan, _, more) = self.plan(key, end, at, limit.max(1), fetch, false)?;
        Ok((plan, more))
    }

    /// The number of keys in `[key, end)` at `at` (already validated), from the index.
    pub fn count_at(&self, key: &[u8], end: &[u8], at: i64) -> Result<i64, KvError> {
        let mut n = 0;
        self.walk_at(key, end, at, |_, _, _| {
            n += 1;
            Ok(true)
        })?;
        Ok(n)
    }

    /// Calls `f` with every key in `[key, end)` that exists at `at`, its visible revision and
    /// what the index knows of it (see [`KeyHistory::shown_at`]), in key order, while it returns
    /// true.
    fn walk_at(
        &self,
        key: &[u8],
        end: &[u8],
        at: i64,
        mut f: impl FnMut(&[u8], Revision, Option<crate::index::KeyMeta>) -> Result<bool, KvError>,
    ) -> Result<(), KvError> {
        self.index.walk(key, end, |k, h| match h.shown_at(at) {
            Some((rev, meta)) => f(k, rev, meta),
            None => Ok(true),
        })
    }

    /// True when a copy of the backend must copy the index's tables as they are (see
    /// [`Backend::copy_to`]).
    pub fn copies_index(&self) -> bool {
        self.index.keeps_rows()
    }

    /// The index walk of [`Store::plan_range`] and [`Store::plan_page`]: the slots, the keys
    /// counted (all of them when `count_all`, else those planned), and whether keys follow the
    /// last one planned.
    fn plan(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch, count_all: bool) -> Result<(ReadPlan, i64, bool), KvError> {
        let mut slots = Vec::new();
        let mut count = 0i64;
        let mut stored = false;
        let mut more = false;
        self.walk_at(key, end, at, |k, rev, meta| {
            if fetch == Fetch::Count || (limit != 0 && slots.len() >= limit) {
                more = true;
                if !count_all {
                    return Ok(false);
                }
                count += 1;
                return Ok(true);
            }
            count += 1;
            let s = self.slot_for(k, rev, meta, fetch)?;
            stored |= matches!(s, Slot::Stored(_));
            slots.push(s);
            Ok(true)
        })?;
        let reader = if stored { Some(self.backend.reader().map_err(KvError::Backend)?) } else { None };
        Ok((ReadPlan { slots, reader, keys_only: fetch == Fetch::Keys }, count, more))
    }

    /// Where a planned read finds one key-value: for a keys-only read, the index itself when it
    /// knows the key's create revision and version.
    fn slot_for(&self, key: &[u8], rev: Revision, meta: Option<crate::index::KeyMeta>, fetch: Fetch) -> Result<Slot, KvError> {
        match (fetch, meta) {
            (Fetch::Keys, Some(m)) => Ok(Slot::Known(m.key_value(key, rev))),
            _ => self.slot(rev),
        }
    }

    /// Keys in `[key, end)` at revision `at` (already validated): up to `limit` key-values (0: all)
    /// as `fetch` says, and the number of keys in the range.
    pub fn range_at(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(Vec<KeyValue>, i64), KvError> {
        let mut reader = None;
        let mut kvs = Vec::new();
        let mut count = 0i64;
        self.walk_at(key, end, at, |k, rev, meta| {
            count += 1;
            if fetch != Fetch::Count && (limit == 0 || kvs.len() < limit) {
                kvs.push(match (fetch, meta) {
                    (Fetch::Keys, Some(m)) => m.key_value(k, rev),
                    (Fetch::Keys, None) => keys_only(self.fetch(&mut reader, rev)?),
                    _ => self.fetch(&mut reader, rev)?,
                });
            }
            Ok(true)
        })?;
        Ok((kvs, count))
    }

    /// Validates a read revision: `at <= 0` means current.
    pub fn check_rev(&self, at: i64, current: i64) -> Result<i64, KvError> {
        let at = if at <= 0 { current } else { at };
        if at > current {
            return Err(KvError::FutureRev);
        }
        if at < self.meta.compacted_rev {
            return Err(KvError::Compacted);
        }
        Ok(at)
    }

    /// The live history of `key`, if the key exists now.
    pub fn live(&self, key: &[u8]) -> Result<Option<Cow<'_, KeyHistory>>, KvError> {
        Ok(self.index.get(key).map_err(KvError::Backend)?.filter(|h| h.is_live()))
    }

    /// Makes write transactions fill in every event's prev_kv (for watchers that want it).
    pub fn set_events_with_prev(&mut self, on: bool) {
        self.events_with_prev = on;
    }

    /// The events of keys in `[key, end)` with revisions in `[from, to]`, in revision order, with
    /// prev_kv when `with_prev` (watchers catching up). `from` must not be compacted.
    pub fn events_between(&self, key: &[u8], end: &[u8], from: i64, to: i64, with_prev: bool) -> Result<Vec<Event>, KvError> {
        self.plan_events(key, end, from, to, with_prev)?.load()
    }

    /// Plans [`Store::events_between`]: an index walk under `&self`; the values are read by
    /// [`EventsPlan::load`] without the store.
    pub fn plan_events(&self, key: &[u8], end: &[u8], from: i64, to: i64, with_prev: bool) -> Result<EventsPlan, KvError> {
        let mut items: Vec<(Revision, PlannedEvent)> = Vec::new();
        let mut stored = false;
        let mut note = |s: Slot| {
            stored |= matches!(s, Slot::Stored(_));
            s
        };
        self.index.walk(key, end, |k, h| {
            let first = h.changes.partition_point(|c| c.main() < from);
            for i in first..h.changes.len() {
                let c = h.changes[i];
                if c.main() > to {
                    break;
                }
                let prev =
                    if with_prev && i > 0 && !h.changes[i - 1].tombstone() { Some(note(self.slot(h.changes[i - 1].rev())?)) } else { None };
                let ev = if c.tombstone() {
                    PlannedEvent::Delete { key: k.to_vec(), rev: c.main(), prev }
                } else {
                    PlannedEvent::Put { value: note(self.slot(c.rev())?), prev }
                };
                items.push((c.rev(), ev));
            }
            Ok::<_, KvError>(true)
        })?;
        items.sort_by_key(|(r, _)| *r);
        let reader = if stored { Some(self.backend.reader().map_err(KvError::Backend)?) } else { None };
        Ok(EventsPlan { items, reader })
    }

    /// Starts a write transaction: all its changes share one main revision.
    pub fn write(&mut self) -> WriteTxn<'_> {
        let main = self.meta.current_rev + 1;
        WriteTxn { store: self, main, sub: 0, events: Vec::new(), lease_changes: Vec::new(), undo: Vec::new(), finished: false }
    }

    /// Plans etcd's HashKV (see [`HashPlan::run`]) at `rev` (0: current): what it needs from the
    /// index and the unflushed batches, and a read transaction of the backend, at one instant.
    pub fn plan_hash_kv(&self, rev: i64) -> Result<HashPlan, KvError> {
        let plan = self.plan_hash_of_backend(rev)?;
        if plan.compacted == 0 {
            return Ok(plan);
        }
        // One walk of every key (no allocation per key).
        let visible = self.index.visible_revisions(plan.upper, plan.compacted).map_err(KvError::Backend)?;
        Ok(plan.keeping(visible))
    }

    /// A [`HashPlan`] of the backend as it is now, with no revision kept from below the
    /// compaction revision yet.
    fn plan_hash_of_backend(&self, rev: i64) -> Result<HashPlan, KvError> {
        let (cur, compacted) = (self.meta.current_rev, self.meta.compacted_rev);
        // As etcd 3.6: the compaction revision itself can still be hashed.
        if rev > 0 && rev < compacted {
            return Err(KvError::Compacted);
        }
        if rev > cur {
            return Err(KvError::FutureRev);
        }
        let upper = if rev == 0 { cur } else { rev };
        // The unflushed changes, newest last: the batch being committed, then the pending one.
        let mut overlay: Changes = self.committing.as_ref().map(|b| b.changes.clone()).unwrap_or_default();
        overlay.extend(self.pending.iter().map(|(k, v)| (k.clone(), v.clone())));
        let reader = self.backend.reader().map_err(KvError::Backend)?;
        Ok(HashPlan { overlay, reader, keep: Vec::new(), any_live: false, upper, cur, compacted })
    }

    /// etcd's HashKV, all at once (the plan run under `&self`).
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), KvError> {
        self.plan_hash_kv(rev)?.run()
    }

    /// Compacts history up to `rev`: from now on no read sees a revision older than `rev`, and
    /// the superseded revisions are dropped from index and backend by [`Store::compact_step`],
    /// [`COMPACTION_BATCH`] keys at a time (each batch under the caller's write lock, readers
    /// and writers in between), as etcd deletes in batches.
    pub fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        if rev <= self.meta.compacted_rev {
            return Err(KvError::Compacted);
        }
        if rev > self.meta.current_rev {
            return Err(KvError::FutureRev);
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("mvcc::compact", |_| std::process::abort());
        // Its hash is of the data before it (as etcd's compaction hashes it); an unfinished
        // older compaction's hash is dropped with it.
        self.compaction_hash = match self.plan_hash_of_backend(rev) {
            Ok(plan) => {
                let below = plan.compacted;
                Some((plan, crate::index::Visible::new(below)))
            }
            Err(e) => {
                tracing::warn!(compact_revision = rev, error = %e, "mvcc: cannot plan the compaction's hash");
                None
            }
        };
        self.meta.compacted_rev = rev;
        // A newer compaction covers what an unfinished older one had left: start over at it.
        self.compacting = Some((rev, Vec::new()));
        tracing::info!(compact_revision = rev, "mvcc: compaction scheduled");
        Ok(())
    }

    /// True while a compaction has batches left.
    pub fn compacting(&self) -> bool {
        self.compacting.is_some()
    }

    /// Runs one batch ([`COMPACTION_BATCH`] keys) of the compaction under way, if any; returns
    /// the revisions it dropped.
    pub fn compact_step(&mut self) -> usize {
        self.compact_keys(COMPACTION_BATCH)
    }

    /// Runs one batch of `keys` keys (at least one) of the compaction under way, if any; returns
    /// the revisions it dropped.
    pub fn compact_keys(&mut self, keys: usize) -> usize {
        let Some((rev, from)) = self.compacting.take() else { return 0 };
        let mut dropped: Vec<Change> = Vec::new();
        let visible = self.compaction_hash.as_mut().map(|(_, v)| v);
        let next = match self.index.compact_batch(rev, &from, keys.max(1), &mut dropped, visible) {
            Ok(next) => next,
            Err(e) => {
                // Nothing was changed: the batch is tried again at the next step.
                tracing::warn!(compact_revision = rev, error = %e, "mvcc: compaction batch failed");
                self.compacting = Some((rev, from));
                return 0;
            }
        };
        let keep_rows = self.index.keeps_rows();
        for c in &dropped {
            let k = c.rev().to_key(c.tombstone());
            if keep_rows {
                if let Some(Some(v)) = self.pending.get(&k) {
                    self.log_only.insert(k.clone(), Some(v.clone()));
                }
            }
            self.pending.insert(k, None);
            self.data_bytes = self.data_bytes.saturating_sub(c.size() as u64);
        }
        match next {
            Some(k) => self.compacting = Some((rev, k)),
            None => {
                tracing::info!(compact_revision = rev, "mvcc: finished scheduled compaction");
                self.finished_hash = self.compaction_hash.take().map(|(plan, visible)| plan.keeping(visible));
            }
        }
        dropped.len()
    }

    /// The hash of the key space at the revision of the compaction that just finished, planned
    /// as it began (see [`HashPlan::run`]; it reads every value: run it off the apply stage).
    /// None when none finished since the last call, or the compaction resumed at a start.
    pub fn take_compaction_hash(&mut self) -> Option<HashPlan> {
        self.finished_hash.take()
    }
}

/// An atomic group of changes at one main revision. Reads through it see its own changes.
///
/// Atomic: until [`WriteTxn::finish`] the changes are the transaction's own (the store's lock
/// keeps readers out), and a transaction dropped without it — an error returned half way — is
/// rolled back: index, unflushed records and sizes exactly as before, its revision never used.
pub struct WriteTxn<'a> {
    store: &'a mut Store,
    main: i64,
    sub: i64,
    events: Vec<Event>,
    /// (key, lease before, lease after) for every change, for the lessor's key sets.
    lease_changes: Vec<(Vec<u8>, i64, i64)>,
    /// For each change (the event of the same position names its key): its revision, the key's
    /// state before it and the record's size.
    undo: Vec<(Revision, crate::keyindex::Before, u32)>,
    finished: bool,
}

/// What a write transaction produced.
pub struct TxnOutcome {
    /// The revision after the transaction (unchanged if it changed nothing).
    pub revision: i64,
    /// Its events, in order.
    pub events: Vec<Event>,
    /// (key, lease before, lease after) for every changed key.
    pub lease_changes: Vec<(Vec<u8>, i64, i64)>,
}

impl WriteTxn<'_> {
    /// The revision reads inside this transaction see by default.
    pub fn read_rev(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.main - 1
        }
    }

    pub fn store(&self) -> &Store {
        self.store
    }

    /// Puts `key`. `value`/`lease` of `None` keep the previous one (ignore_value/ignore_lease); the
    /// caller has checked that the key exists in that case. Returns the previous key-value.
    pub fn put(&mut self, key: &[u8], value: Option<&[u8]>, lease: Option<i64>, want_prev: bool) -> Result<Option<KeyValue>, KvError> {
        let rev = Revision::new(self.main, self.sub);
        let live = self.store.live(key)?.map(Cow::into_owned);
        let old_lease = live.as_ref().map(|h| h.lease).unwrap_or(0);
        let (created, version, prev) = match &live {
            Some(h) => {
                let cur = h.changes.last().map(|c| c.rev()).unwrap_or_default();
                let (created, version) = (h.created, h.version);
                let prev = if want_prev || value.is_none() || lease.is_none() || self.store.events_with_prev {
                    let mut r = None;
                    Some(self.store.fetch(&mut r, cur)?)
                } else {
                    None
                };
                (created, version, prev)
            }
            None => (self.main, 0, None),
        };
        let value = match value {
            Some(v) => v.to_vec(),
            None => prev.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
        };
        let lease = match lease {
            Some(l) => l,
            None => prev.as_ref().map(|p| p.lease).unwrap_or(0),
        };
        let kv = KeyValue { key: key.to_vec(), create_revision: created, mod_revision: self.main, version: version + 1, value, lease };
        let rec = kv.encode_to_vec();
        let size = (rec.len() + crate::revision::REV_BYTES) as u32;
        let before = self.store.index.before(key);
        self.store.index.put(key, rev, lease, size).map_err(KvError::Backend)?;
        self.undo.push((rev, before, size));
        self.store.data_bytes += size as u64;
        self.store.pending.insert(rev.to_key(false), Some(Arc::from(rec)));
        self.sub += 1;
        if old_lease != 0 || lease != 0 {
            self.lease_changes.push((key.to_vec(), old_lease, lease));
        }
        self.events.push(Event { r#type: EventType::Put as i32, kv: Some(kv), prev_kv: prev.clone() });
        // Fault injection: the backend failing after a change (the caller rolls back and stops).
        #[cfg(feature = "failpoints")]
        fail::fail_point!("mvcc::write_error", |_| Err(injected()));
        Ok(prev)
    }

    /// Deletes the live keys in `[key, end)`; returns the deleted key-values when asked (else
    /// bare keys), and their number.
    pub fn delete_range(&mut self, key: &[u8], end: &[u8], want_prev: bool) -> Result<(i64, Vec<KeyValue>), KvError> {
        let mut targets: Vec<(Vec<u8>, Revision, i64)> = Vec::new();
        self.store.index.walk(key, end, |k, h| {
            if h.is_live() {
                targets.push((k.to_vec(), h.changes.last().map(|c| c.rev()).unwrap_or_default(), h.lease));
            }
            Ok::<_, KvError>(true)
        })?;
        let mut prevs = Vec::new();
        let mut reader = None;
        for (k, cur, lease) in &targets {
            let prev = if want_prev || self.store.events_with_prev { Some(self.store.fetch(&mut reader, *cur)?) } else { None };
            if *lease != 0 {
                self.lease_changes.push((k.clone(), *lease, 0));
            }
            let rev = Revision::new(self.main, self.sub);
            let tomb = KeyValue { key: k.clone(), ..Default::default() };
            let rec = tomb.encode_to_vec();
            let size = (rec.len() + crate::revision::REV_BYTES + 1) as u32;
            let before = self.store.index.before(k);
            self.store.index.tombstone(k, rev, size).map_err(KvError::Backend)?;
            self.undo.push((rev, before, size));
            self.store.data_bytes += size as u64;
            self.store.pending.insert(rev.to_key(true), Some(Arc::from(rec)));
            self.sub += 1;
            let ev_kv = KeyValue { key: k.clone(), mod_revision: self.main, ..Default::default() };
            self.events.push(Event { r#type: EventType::Delete as i32, kv: Some(ev_kv), prev_kv: prev.clone() });
            if let (Some(p), true) = (prev, want_prev) {
                prevs.push(p);
            }
            #[cfg(feature = "failpoints")]
            fail::fail_point!("mvcc::write_error", |_| Err(injected()));
        }
        Ok((targets.len() as i64, prevs))
    }

    /// Range as seen inside this transaction (`at` already validated against `read_rev`).
    pub fn range_at(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.store.range_at(key, end, at, limit, fetch)
    }

    /// Ends the transaction; returns the revision it produced (or the unchanged current one) and
    /// its events, in order.
    pub fn end(self) -> (i64, Vec<Event>) {
        let o = self.finish();
        (o.revision, o.events)
    }

    /// True once the transaction has changed something (a failure after this point cannot be
    /// undone: the caller must not publish or reuse the revision).
    pub fn changed(&self) -> bool {
        self.sub > 0
    }

    /// Ends the transaction with everything it produced.
    pub fn finish(mut self) -> TxnOutcome {
        self.finished = true;
        if self.sub > 0 {
            self.store.meta.current_rev = self.main;
        }
        let events = std::mem::take(&mut self.events);
        let lease_changes = std::mem::take(&mut self.lease_changes);
        TxnOutcome { revision: self.store.meta.current_rev, events, lease_changes }
    }

    /// Takes back every change, newest first: the store is as it was before the transaction.
    pub fn rollback(mut self) {
        self.undo_all();
        self.finished = true;
    }

    fn undo_all(&mut self) {
        debug_assert_eq!(self.undo.len(), self.events.len(), "one undo record per change");
        while let Some((rev, before, size)) = self.undo.pop() {
            let Some(e) = self.events.get(self.undo.len()) else { continue };
            let Some(kv) = e.kv.as_ref() else { continue };
            self.store.index.undo(&kv.key, rev, before);
            self.store.pending.remove(&rev.to_key(e.r#type == EventType::Delete as i32));
            self.store.data_bytes -= size as u64;
        }
        self.events.clear();
        self.lease_changes.clear();
        self.sub = 0;
    }
}

#[cfg(feature = "failpoints")]
fn injected() -> KvError {
    KvError::Backend(BackendError {
        path: std::path::PathBuf::from("(injected)"),
        msg: "injected backend error (mvcc::write_error)".into(),
    })
}

impl Drop for WriteTxn<'_> {
    fn drop(&mut self) {
        if !self.finished && self.sub > 0 {
            tracing::warn!(revision = self.main, changes = self.sub, "mvcc: write transaction dropped unfinished; rolled back");
            self.undo_all();
        }
    }
}

/// What a range reads of each key-value in range (etcd 3.7's range options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Nothing: only the number of keys (`count_only`).
    Count,
    /// Keys and their revisions (`keys_only`, not sorted by value): from the index where it
    /// knows them, without reading values (etcd 3.7's fast keys-only read; no lease either).
    Keys,
    /// Whole key-values.
    Values,
}

impl Fetch {
    /// What `req` needs read, as etcd 3.7 decides it.
    pub fn of(req: &keel_proto::etcdserverpb::RangeRequest) -> Fetch {
        use keel_proto::etcdserverpb::range_request::SortTarget;
        if req.count_only {
            Fetch::Count
        } else if req.keys_only && req.sort_target != SortTarget::Value as i32 {
            Fetch::Keys
        } else {
            Fetch::Values
        }
    }
}

/// Where a planned read finds one value.
enum Slot {
    /// The key-value itself, from the index (a keys-only read).
    Known(KeyValue),
    /// The record, not yet in the backend.
    Record(Arc<[u8]>),
    /// The revision key of a record in the backend (at the plan's read transaction).
    Stored(Vec<u8>),
}

/// A key-value as a keys-only read answers it (etcd 3.7's, from its index): no value, no lease.
fn keys_only(kv: KeyValue) -> KeyValue {
    KeyValue { value: Vec::new(), lease: 0, ..kv }
}

impl Slot {
    /// The key-value, read through `reader` (the plan's read transaction) if it is stored.
    fn read(self, reader: Option<&Reader>) -> Result<KeyValue, KvError> {
        match self {
            Slot::Known(kv) => Ok(kv),
            Slot::Record(v) => decode_kv(&v),
            Slot::Stored(k) => {
                let r = reader.ok_or_else(|| KvError::Corrupt("planned read without a reader".into()))?;
                match r.get(&k).map_err(KvError::Backend)? {
                    Some(v) => decode_kv(&v),
                    None => {
                        let rev = Revision::from_key(&k).map(|(r, _)| r).unwrap_or_default();
                        Err(KvError::Corrupt(format!("revision {rev:?} is indexed but missing from the backend")))
                    }
                }
            }
        }
    }
}

/// A read planned under the store's lock, loaded without it: the values of the planned
/// revisions as they were at that instant (unflushed records held here, the rest through a
/// redb read transaction opened then, which later commits do not change).
pub struct ReadPlan {
    slots: Vec<Slot>,
    reader: Option<Reader>,
    /// A keys-only read: what is read from the backend loses its value and lease too.
    keys_only: bool,
}

impl ReadPlan {
    /// Key-values planned.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Reads and decodes the planned key-values, in order.
    pub fn load(self) -> Result<Vec<KeyValue>, KvError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for s in self.slots {
            let kv = s.read(self.reader.as_ref())?;
            out.push(if self.keys_only { keys_only(kv) } else { kv });
        }
        Ok(out)
    }
}

/// etcd's HashKV planned by [`Store::plan_hash_kv`].
pub struct HashPlan {
    overlay: Changes,
    reader: Reader,
    /// The revisions at or below `compacted` that are their key's newest change at `upper`.
    keep: Vec<Revision>,
    any_live: bool,
    upper: i64,
    cur: i64,
    compacted: i64,
}

impl HashPlan {
    /// The plan with what a walk of the keys found visible at its revision, kept up to its
    /// compaction revision. As etcd: entries at or below the compaction revision count only
    /// when they are their key's newest value at the revision hashed (with no compaction, all).
    fn keeping(mut self, visible: crate::index::Visible) -> HashPlan {
        if self.compacted > 0 {
            self.any_live = visible.any();
            self.keep = visible.into_revs();
        }
        self
    }

    /// The revision the hash covers up to: the one asked for, or the current one for 0.
    pub fn revision(&self) -> i64 {
        self.upper
    }

    /// CRC-32C over the key table's entries (revision key, KeyValue record) up to the planned
    /// revision, starting with the table name. The records are encoded as etcd's, so the hash
    /// matches etcd's for the same history. Returns (hash, current revision, compacted revision).
    pub fn run(self) -> Result<(u32, i64, i64), KvError> {
        self.run_at(None)
    }

    /// [`HashPlan::run`] in the background (a finished compaction's hash): its reads from the
    /// disk are paced (`pace::BACKGROUND_READ_BYTES_PER_SEC`). Unpaced, the three members
    /// hashing 5 GB each at once after a compaction held a writer's puts up to 70-110 ms.
    pub fn run_paced(self) -> Result<(u32, i64, i64), KvError> {
        self.run_at(Some(crate::pace::ReadPace::new(crate::pace::BACKGROUND_READ_BYTES_PER_SEC)))
    }

    fn run_at(self, pace: Option<crate::pace::ReadPace>) -> Result<(u32, i64, i64), KvError> {
        let HashPlan { overlay, reader, mut keep, any_live, upper, cur, compacted } = self;
        let mut scanned = 0u64;
        keep.sort_unstable();
        let mut crc = crc32c::crc32c(b"key");
        let mut add = |k: &[u8], v: &[u8]| {
            crc = crc32c::crc32c_append(crc, k);
            crc = crc32c::crc32c_append(crc, v);
        };
        // A tombstone at the compaction revision is left out (etcd 3.6: older releases deleted
        // it when compacting, newer ones keep it, and both must hash alike).
        let within = |k: &[u8]| match Revision::from_key(k) {
            Some((r, tomb)) if r.main <= upper => {
                !(tomb && r.main == compacted) && (r.main > compacted || !any_live || (!tomb && keep.binary_search(&r).is_ok()))
            }
            _ => false,
        };
        // Merge the committed table with the unflushed changes, in key (= revision) order.
        let mut pending = overlay.iter().peekable();
        reader
            .scan(|k, v| {
                scanned += 1;
                if scanned.is_multiple_of(4096) {
                    if let Some(pace) = &pace {
                        pace.wait();
                    }
                }
                while let Some((pk, pv)) = pending.peek() {
                    if pk.as_slice() < k {
                        if let Some(pv) = pv {
                            if within(pk) {
                                add(pk, pv);
                            }
                        }
                        pending.next();
                    } else {
                        break;
                    }
                }
                if let Some((pk, pv)) = pending.peek() {
                    if pk.as_slice() == k {
                        if let Some(pv) = pv {
                            if within(k) {
                                add(k, pv);
                            }
                        }
                        pending.next();
                        return Ok(());
                    }
                }
                if within(k) {
                    add(k, v);
                }
                Ok(())
            })
            .map_err(KvError::Backend)?;
        for (pk, pv) in pending {
            if let Some(pv) = pv {
                if within(pk) {
                    add(pk, pv);
                }
            }
        }
        Ok((crc, cur, compacted))
    }
}

enum PlannedEvent {
    Put { value: Slot, prev: Option<Slot> },
    Delete { key: Vec<u8>, rev: i64, prev: Option<Slot> },
}

/// Watch history planned by [`Store::plan_events`].
pub struct EventsPlan {
    items: Vec<(Revision, PlannedEvent)>,
    reader: Option<Reader>,
}

impl EventsPlan {
    fn read(&self, s: Slot) -> Result<KeyValue, KvError> {
        s.read(self.reader.as_ref())
    }

    /// The planned events, in revision order.
    pub fn load(mut self) -> Result<Vec<Event>, KvError> {
        let items = std::mem::take(&mut self.items);
        let mut out = Vec::with_capacity(items.len());
        for (_, ev) in items {
            out.push(match ev {
                PlannedEvent::Put { value, prev } => {
                    Event { r#type: EventType::Put as i32, kv: Some(self.read(value)?), prev_kv: prev.map(|p| self.read(p)).transpose()? }
                }
                PlannedEvent::Delete { key, rev, prev } => Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(KeyValue { key, mod_revision: rev, ..Default::default() }),
                    prev_kv: prev.map(|p| self.read(p)).transpose()?,
                },
            });
        }
        Ok(out)
    }
}

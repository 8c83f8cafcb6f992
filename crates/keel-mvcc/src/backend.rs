//! The persistent backend: redb tables `key` (revision -> mvccpb.KeyValue; a record longer than
//! a page keeps its full parts in `key_part`, see module `parts`), `key_index` (the key index's
//! rows, see [`Backend::read_index`]), `meta` and `aux`.
//!
//! Writes are buffered by the store and committed here in batches, each batch in one redb
//! transaction together with the consistent index, so that a crash leaves the backend at a batch
//! boundary and replaying the WAL from the stored consistent index applies each entry exactly once.
//!
//! Owns the redb database of one file. Calls redb, module `parts`, and `keel_reclaim` for a
//! replaced file ([`Backend::retire`]).

use crate::layered::IndexLog;
use crate::parts::{self, PARTS};
use crate::revision::Revision;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Key-table changes by revision key: Some(record) to write, None to delete (a batch).
pub type Changes = BTreeMap<Vec<u8>, Option<std::sync::Arc<[u8]>>>;

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The persisted key index: one row per `key` record, keyed by the record's revision key
/// (tombstone mark left out), holding what the in-memory index needs of the record: its user key
/// and [`IndexRow`]. Written in the same transactions as the records, so that a start reads these
/// small rows instead of every record with its value. Keyed by revision, as the records are, so
/// that writes append to it (keyed by user key, each write would copy a random leaf page: 4x
/// slower loads).
const KEY_INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key_index");
/// Key histories by user key (see [`crate::index::KeyHistory::encode`]): the committed base of
/// an index kept in the backend ([`crate::layered`]). Not written by the store yet.
const KEY_BY_KEY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key_by_key");
/// Records of other modules (members, ...), committed in the same batches as keys.
const AUX: TableDefinition<&str, &[u8]> = TableDefinition::new("aux");

const META_CONSISTENT_INDEX: &str = "consistent_index";
const META_TERM: &str = "term";
const META_CURRENT_REV: &str = "current_revision";
const META_COMPACTED_REV: &str = "finished_compact_revision";
/// What table `key_by_key` holds (see [`ByKeyMeta`]).
const META_BY_KEY_UPTO: &str = "key_by_key_upto";
const META_BY_KEY_LIVE: &str = "key_by_key_live";
const META_BY_KEY_TOTAL: &str = "key_by_key_total";
const META_BY_KEY_BYTES: &str = "key_by_key_bytes";
/// Present (1) when `key_index` holds a row for every `key` record: set when the file is created
/// and when an index is built for a file that had none (written by an older Keel). 2 when the
/// index is kept in the backend: `key_by_key` holds every change up to its merge revision and
/// `key_index` is the log since (any other value makes `key_by_key` stale: dropped at open).
const META_KEY_INDEX: &str = "key_index_complete";
const KEY_INDEX_COMPLETE: u64 = 1;
const KEY_INDEX_LOG: u64 = 2;

/// Rows per transaction when building the key index of a file that has none.
const INDEX_BUILD_BATCH: usize = 100_000;

pub use crate::error::BackendError;

/// What the backend records besides keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Index of the last raft entry whose effects are in the backend.
    pub consistent_index: u64,
    pub term: u64,
    pub current_rev: i64,
    pub compacted_rev: i64,
}

/// What table `key_by_key` holds: every change up to revision `upto` (the last merge's), and
/// its rows counted: keys, live keys, and bytes of the records their changes stand for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByKeyMeta {
    pub upto: i64,
    pub live: u64,
    pub total: u64,
    pub bytes: u64,
}

/// A handle to the backend file; clones share it (a snapshot sender reads while the store
/// writes).
#[derive(Clone)]
pub struct Backend {
    // Declared before `retire`: the last handle closes redb's file before giving it back.
    db: std::sync::Arc<Database>,
    retire: std::sync::Arc<Retire>,
    path: PathBuf,
    /// Opening the file walked and checked all of it (see [`Backend::repaired`]).
    repaired: bool,
}

/// The file of a backend being replaced ([`Backend::retire`]), held by a descriptor of its own:
/// when the last handle on the backend and the last of its readers are gone, it is given to
/// `keel_reclaim`, which frees an unlinked file's blocks in small steps (freeing a few GB at
/// once holds every fsync on the disk, the WAL's too, for a few hundred milliseconds) and
/// leaves a file that still has a name alone.
#[derive(Default)]
struct Retire(std::sync::Mutex<Option<std::fs::File>>);

impl Drop for Retire {
    fn drop(&mut self) {
        let file = match self.0.get_mut() {
            Ok(f) => f.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(f) = file {
            keel_reclaim::release(f);
        }
    }
}

/// Whether a commit is made durable ([`Backend::commit_with`]).
///
/// A durable commit is synced and records redb's allocator state, which lets a start after a
/// crash load it rather than walk the whole file. That record is every region's allocation
/// bitmaps, rewritten whole by each such commit, and the commit syncs twice (two-phase): at
/// 1 GB of data 1.4 ms and 316 KiB written per commit, at 5 GB 3.5 ms and 1.26 MB, growing
/// with the file (`examples/commit_cost.rs`). A visible commit is neither: it is seen by
/// every later transaction of this process, and a crash takes the file back to its last
/// durable commit (whose allocator state is still the one a start loads), from where the WAL
/// replays what followed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    #[default]
    Durable,
    Visible,
}

/// Told how long each backend batch commit took (the server's metrics); set once at start.
pub static COMMIT_OBSERVER: std::sync::OnceLock<fn(std::time::Duration)> = std::sync::OnceLock::new();

/// redb's page cache. Reads of the latest values mostly hit the store's pending batch or the OS
/// page cache; redb's default (1 GiB) made resident memory grow with the database.
const CACHE_BYTES: usize = 64 << 20;

/// A table of byte keys and values.
type BytesTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// Table numbers in a backend dump.
pub const TABLE_KEYS: u32 = 0;
pub const TABLE_AUX: u32 = 1;
/// Rows of table `key_index`, as they are (a defragmentation's copy of an index kept in the backend).
pub const TABLE_INDEX_ROWS: u32 = 2;
/// Rows of table `key_by_key`, as they are.
pub const TABLE_BY_KEY: u32 = 3;

/// Records, and bytes, per transaction when copying a backend. Each is synced on its own, and
/// another file's fsync on the same disk may wait for one to be written: 10,000 records of
/// 1 KiB (~11 MB) held a WAL-like probe's fsyncs up to ~90 ms at p99, ~2 MB up to ~14 ms.
const COPY_BATCH: usize = 10_000;
const COPY_BATCH_BYTES: usize = 4 << 20;

/// Fsyncs the directory holding `path`, so that its entry (a creation, a rename) is durable.
fn sync_parent(path: &Path) -> Result<(), BackendError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackendError { path: dir.to_path_buf(), msg: format!("fsync of the directory: {e}") })
}

impl Backend {
    fn err(&self, e: impl std::fmt::Display) -> BackendError {
        BackendError { path: self.path.clone(), msg: e.to_string() }
    }

    /// Opens or creates the backend file.
    pub fn open(path: &Path) -> Result<Backend, BackendError> {
        let mk = |e: &dyn std::fmt::Display| BackendError { path: path.to_path_buf(), msg: e.to_string() };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| mk(&e))?;
        }
        let new = !path.exists();
        let shown = path.display().to_string();
        let repairing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = repairing.clone();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_repair_callback(move |session| {
                // Only a file whose last commit did not record the allocator state (one written
                // before quick repair, or by an older Keel) is walked in full.
                if !seen.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(path = %shown, progress = session.progress(), "backend was not shut down cleanly and has no recorded allocator state: checking and repairing the whole file");
                }
            })
            .create(path)
            .map_err(|e| mk(&e))?;
        let repaired = repairing.load(std::sync::atomic::Ordering::Relaxed);
        let b = Backend { db: std::sync::Arc::new(db), retire: Default::default(), path: path.to_path_buf(), repaired };
        // Make sure both tables exist so that read transactions can always open them.
        let mut tx = b.db.begin_write().map_err(|e| b.err(e))?;
        tx.set_quick_repair(true);
        {
            tx.open_table(KEYS).map_err(|e| b.err(e))?;
            tx.open_table(PARTS).map_err(|e| b.err(e))?;
            tx.open_table(META).map_err(|e| b.err(e))?;
            tx.open_table(AUX).map_err(|e| b.err(e))?;
            tx.open_table(KEY_INDEX).map_err(|e| b.err(e))?;
            if new {
                // No records yet: the (empty) index is complete, and every write keeps it so.
                let mut m = tx.open_table(META).map_err(|e| b.err(e))?;
                m.insert(META_KEY_INDEX, 1u64.to_be_bytes().as_slice()).map_err(|e| b.err(e))?;
            }
        }
        tx.commit().map_err(|e| b.err(e))?;
        if new {
            // The new file's entry in its directory, or a power cut takes the whole backend.
            sync_parent(path)?;
        }
        Ok(b)
    }

    /// True when opening the file had to walk and checksum all of it to rebuild redb's
    /// allocator state (seconds per GB): its last commit before a crash did not record that
    /// state. Every commit of this backend records it (redb's quick repair), so only a file
    /// written otherwise (an older Keel) is walked.
    pub fn repaired(&self) -> bool {
        self.repaired
    }

    pub fn read_meta(&self) -> Result<Meta, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        self.meta_of(&tx)
    }

    /// The meta record as one read transaction sees it.
    fn meta_of(&self, tx: &redb::ReadTransaction) -> Result<Meta, BackendError> {
        let t = tx.open_table(META).map_err(|e| self.err(e))?;
        let get = |k: &str| self.meta_u64(&t, k);
        Ok(Meta {
            consistent_index: get(META_CONSISTENT_INDEX)?,
            term: get(META_TERM)?,
            current_rev: get(META_CURRENT_REV)? as i64,
            compacted_rev: get(META_COMPACTED_REV)? as i64,
        })
    }

    /// A number of the meta table (0 when absent).
    fn meta_u64(&self, t: &impl ReadableTable<&'static str, &'static [u8]>, k: &str) -> Result<u64, BackendError> {
        match t.get(k).map_err(|e| self.err(e))? {
            Some(v) => {
                let b: [u8; 8] = v.value().try_into().map_err(|_| self.err(format!("meta {k} is not 8 bytes")))?;
                Ok(u64::from_be_bytes(b))
            }
            None => Ok(0),
        }
    }

    /// Writes the meta record within a write transaction.
    fn put_meta(&self, tx: &redb::WriteTransaction, meta: &Meta) -> Result<(), BackendError> {
        let mut m = tx.open_table(META).map_err(|e| self.err(e))?;
        for (k, v) in [
            (META_CONSISTENT_INDEX, meta.consistent_index),
            (META_TERM, meta.term),
            (META_CURRENT_REV, meta.current_rev as u64),
            (META_COMPACTED_REV, meta.compacted_rev as u64),
        ] {
            m.insert(k, v.to_be_bytes().as_slice()).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Durably commits one batch: key puts (`Some`) and deletes (`None`) plus the meta record.
    pub fn commit(&self, changes: &Changes, aux: &BTreeMap<String, Vec<u8>>, meta: &Meta) -> Result<(), BackendError> {
        self.commit_with(changes, aux, meta, &IndexLog::default(), CommitMode::Durable)
    }

    /// [`Backend::commit`] with what an index kept in the backend writes in the same transaction
    /// (see [`IndexLog`]): its merge parts, after the records; durable or not as `sync` says.
    pub fn commit_with(
        &self,
        changes: &Changes,
        aux: &BTreeMap<String, Vec<u8>>,
        meta: &Meta,
        log: &IndexLog,
        sync: CommitMode,
    ) -> Result<(), BackendError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        match sync {
            // Quick repair: the commit records redb's allocator state (two-phase commit), so
            // that opening the file after a crash loads it instead of walking and checksumming
            // every page (a full repair reads the whole file: seconds per GB).
            CommitMode::Durable => tx.set_quick_repair(true),
            CommitMode::Visible => tx.set_durability(redb::Durability::None).map_err(|e| self.err(e))?,
        }
        {
            let mut a = tx.open_table(AUX).map_err(|e| self.err(e))?;
            for (k, v) in aux {
                // An empty value removes the record.
                if v.is_empty() {
                    a.remove(k.as_str()).map_err(|e| self.err(e))?;
                } else {
                    a.insert(k.as_str(), v.as_slice()).map_err(|e| self.err(e))?;
                }
            }
            let mut keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let mut parts = tx.open_table(PARTS).map_err(|e| self.err(e))?;
            let mut index = tx.open_table(KEY_INDEX).map_err(|e| self.err(e))?;
            for (k, v) in changes {
                match v {
                    Some(v) => {
                        parts::put(&mut keys, &mut parts, k, v).map_err(|e| self.err(e))?;
                        self.put_index_row(&mut index, k, v)?;
                    }
                    None => {
                        parts::remove(&mut keys, &mut parts, k).map_err(|e| self.err(e))?;
                        // The row is keyed by the record's revision: no need to read the record.
                        if !log.keep_rows {
                            index.remove(&self.revision(k)?.0.key_bytes()[..]).map_err(|e| self.err(e))?;
                        }
                    }
                }
            }
        }
        if !log.rows.is_empty() {
            let mut index = tx.open_table(KEY_INDEX).map_err(|e| self.err(e))?;
            for (k, v) in &log.rows {
                if let Some(v) = v {
                    self.put_index_row(&mut index, k, v)?;
                }
            }
        }
        for part in &log.parts {
            self.write_histories(&tx, part.entries(), part.upto())?;
        }
        self.put_meta(&tx, meta)?;
        #[cfg(feature = "failpoints")]
        fail::fail_point!("backend::before_commit", |_| std::process::abort());
        let t0 = std::time::Instant::now();
        tx.commit().map_err(|e| self.err(e))?;
        if let Some(observe) = COMMIT_OBSERVER.get() {
            observe(t0.elapsed());
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("backend::after_commit", |_| std::process::abort());
        Ok(())
    }

    /// The revision (and tombstone mark) of the revision key `k` of table `key`.
    fn revision(&self, k: &[u8]) -> Result<(Revision, bool), BackendError> {
        Revision::from_key(k).ok_or_else(|| self.err(format!("bad revision key {k:?} in table key")))
    }

    /// The key index entry of the `key` record `v` at revision key `k`: its user key and row.
    fn index_entry(&self, k: &[u8], v: &[u8]) -> Result<(Vec<u8>, IndexRow), BackendError> {
        let (rev, tombstone) = self.revision(k)?;
        let f = IndexFields::decode(v).map_err(|e| self.err(format!("undecodable record at revision {rev:?} in table key: {e}")))?;
        let row = IndexRow {
            rev,
            tombstone,
            create_revision: f.create_revision,
            version: f.version,
            lease: f.lease,
            size: (k.len() + v.len()) as u32,
        };
        Ok((f.key, row))
    }

    /// Writes the key index row of the `key` record `v` at revision key `k` into `index`; returns
    /// its user key and row.
    fn put_index_row(&self, index: &mut redb::Table<&[u8], &[u8]>, k: &[u8], v: &[u8]) -> Result<(Vec<u8>, IndexRow), BackendError> {
        let (key, row) = self.index_entry(k, v)?;
        index.insert(&row.rev.key_bytes()[..], row.encode(&key).as_slice()).map_err(|e| self.err(e))?;
        Ok((key, row))
    }

    /// Gives `sink` a row for every record of the committed state, in revision order: from the
    /// persisted key index when it is complete (no record value is read), else from the records
    /// themselves, after which the index is built for the next
    /// start. Returns how the rows were read.
    ///
    /// The index counts as complete when the file's meta says so and it has exactly one row per
    /// record (two lengths redb keeps). One that is not, or that holds a row that does not
    /// decode, is built again from the records, after a warning (and `sink.clear()` when rows
    /// were already given).
    pub fn read_index(&self, sink: &mut dyn IndexSink) -> Result<IndexSource, BackendError> {
        let damaged = match self.read_persisted_index(sink)? {
            Ok(()) => return Ok(IndexSource::Persisted),
            Err(damaged) => damaged,
        };
        if let Some(why) = &damaged {
            tracing::warn!(path = %self.path.display(), reason = %why, "mvcc: the persisted key index does not match the records; building it again");
        }
        self.build_index(sink)?;
        Ok(IndexSource::Built)
    }

    /// The persisted index's rows to `sink`: `Ok(Err(why))` when it cannot be used (why: None
    /// when there is none, the reason when it is damaged; `sink` then holds nothing).
    fn read_persisted_index(&self, sink: &mut dyn IndexSink) -> Result<Result<(), Option<String>>, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let complete = tx
            .open_table(META)
            .map_err(|e| self.err(e))?
            .get(META_KEY_INDEX)
            .map_err(|e| self.err(e))?
            .is_some_and(|v| v.value() == KEY_INDEX_COMPLETE.to_be_bytes());
        let index = match tx.open_table(KEY_INDEX) {
            Ok(t) if complete => t,
            Ok(_) | Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Err(None)),
            Err(e) => return Err(self.err(e)),
        };
        let records = tx.open_table(KEYS).map_err(|e| self.err(e))?.len().map_err(|e| self.err(e))?;
        let rows = index.len().map_err(|e| self.err(e))?;
        if records != rows {
            return Ok(Err(Some(format!("{rows} index rows for {records} records"))));
        }
        sink.reserve(self.plausible_rows(rows));
        let last = match index.last().map_err(|e| self.err(e))? {
            Some((k, _)) => Revision::from_key(k.value()).map(|(r, _)| r.main),
            None => None,
        };
        let reader = prefetch::Reader::default();
        std::thread::scope(|scope| -> Result<Result<(), Option<String>>, BackendError> {
            let started = std::time::Instant::now();
            for (n, item) in index.iter().map_err(|e| self.err(e))?.enumerate() {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let (k, v) = (k.value(), v.value());
                let Some((key, row)) = IndexRow::decode(k, v) else {
                    reader.done();
                    sink.clear();
                    return Ok(Err(Some(format!("index row {k:?} does not decode"))));
                };
                if n == prefetch::PROBE_ROWS && started.elapsed() > prefetch::COLD {
                    if let Some(last) = last {
                        // Joined at the scope's end; what they walked is of no use here.
                        drop(reader.start(scope, &self.db, row.rev.main, last));
                    }
                }
                if n % prefetch::PROBE_ROWS == 0 {
                    reader.at(row.rev.main);
                }
                sink.row(key, row);
            }
            reader.done();
            Ok(Ok(()))
        })
    }

    /// Builds the key index from the records (a file written by an older Keel, or one whose index
    /// was found damaged), giving `sink` each row as it goes (one read of the records): the old
    /// rows are dropped, the new ones written in transactions of [`INDEX_BUILD_BATCH`] records,
    /// and the index marked complete in the last, durable one. A crash before that leaves it
    /// marked incomplete, to be built again at the next start. Runs before the store serves: no
    /// other transaction writes meanwhile.
    fn build_index(&self, sink: &mut dyn IndexSink) -> Result<(), BackendError> {
        self.build_index_in(INDEX_BUILD_BATCH, sink, |_| {})
    }

    /// `rows` (a table's length, as the file records it) as a count to make room for: at most
    /// one per 17 bytes of the file (a record's key alone is a 17-byte revision), so that a
    /// damaged length cannot ask for more memory than the file could describe.
    fn plausible_rows(&self, rows: u64) -> usize {
        let file = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        usize::try_from(rows.min(file / 17)).unwrap_or(0)
    }

    /// [`Backend::build_index`] in transactions of `batch` records; `committed(n)` is told of
    /// each of them but the last, after its commit.
    fn build_index_in(&self, batch: usize, sink: &mut dyn IndexSink, mut committed: impl FnMut(usize)) -> Result<(), BackendError> {
        let started = std::time::Instant::now();
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(redb::Durability::None).map_err(|e| self.err(e))?;
        {
            tx.open_table(META).map_err(|e| self.err(e))?.remove(META_KEY_INDEX).map_err(|e| self.err(e))?;
            tx.delete_table(KEY_INDEX).map_err(|e| self.err(e))?;
            tx.open_table(KEY_INDEX).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        let records =
            self.db.begin_read().map_err(|e| self.err(e))?.open_table(KEYS).map_err(|e| self.err(e))?.len().map_err(|e| self.err(e))?;
        sink.reserve(self.plausible_rows(records));
        let mut from: Option<Vec<u8>> = None;
        let mut rows = 0u64;
        let mut n_batches = 0usize;
        loop {
            let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
            let last;
            {
                let keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
                let parts = tx.open_table(PARTS).map_err(|e| self.err(e))?;
                let mut index = tx.open_table(KEY_INDEX).map_err(|e| self.err(e))?;
                let range = match &from {
                    Some(f) => keys.range::<&[u8]>((std::ops::Bound::Excluded(f.as_slice()), std::ops::Bound::Unbounded)),
                    None => keys.range::<&[u8]>(..),
                }
                .map_err(|e| self.err(e))?;
                let mut n = 0;
                let mut end = None;
                for item in range {
                    let (k, v) = item.map_err(|e| self.err(e))?;
                    let v = parts::record(&parts, k.value(), v.value()).map_err(|e| self.err(e))?;
                    let (key, row) = self.put_index_row(&mut index, k.value(), &v)?;
                    sink.row(&key, row);
                    n += 1;
                    if n == batch {
                        end = Some(k.value().to_vec());
                        break;
                    }
                }
                rows += n as u64;
                last = end.is_none();
                from = end;
                if last {
                    let mut m = tx.open_table(META).map_err(|e| self.err(e))?;
                    m.insert(META_KEY_INDEX, 1u64.to_be_bytes().as_slice()).map_err(|e| self.err(e))?;
                }
            }
            if last {
                tx.set_quick_repair(true);
            } else {
                tx.set_durability(redb::Durability::None).map_err(|e| self.err(e))?;
            }
            tx.commit().map_err(|e| self.err(e))?;
            if last {
                break;
            }
            committed(n_batches);
            n_batches += 1;
        }
        tracing::info!(path = %self.path.display(), rows, took = ?started.elapsed(), "mvcc: built the persisted key index");
        Ok(())
    }

    /// Every auxiliary record.
    pub fn read_aux(&self) -> Result<BTreeMap<String, Vec<u8>>, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(AUX).map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.insert(k.value().to_string(), v.value().to_vec());
        }
        Ok(out)
    }

    /// Starts a consistent read of the committed state.
    pub fn reader(&self) -> Result<Reader, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(KEYS).map_err(|e| self.err(e))?;
        let parts = tx.open_table(PARTS).map_err(|e| self.err(e))?;
        Ok(Reader { table, parts, path: self.path.clone(), _db: self.db.clone(), _file: self.retire.clone() })
    }

    /// A read-only view of the committed key histories (table `key_by_key`; empty when the
    /// file has none).
    pub fn histories(&self) -> Result<Histories, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match tx.open_table(KEY_BY_KEY) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(self.err(e)),
        };
        Ok(Histories { table, path: self.path.clone(), _db: self.db.clone(), _file: self.retire.clone() })
    }

    /// What table `key_by_key` holds, as its meta records say.
    pub fn by_key_meta(&self) -> Result<ByKeyMeta, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        self.by_key_meta_of(&tx.open_table(META).map_err(|e| self.err(e))?)
    }

    /// [`Backend::by_key_meta`] as the meta table `t` holds it.
    fn by_key_meta_of(&self, t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<ByKeyMeta, BackendError> {
        Ok(ByKeyMeta {
            upto: self.meta_u64(t, META_BY_KEY_UPTO)? as i64,
            live: self.meta_u64(t, META_BY_KEY_LIVE)?,
            total: self.meta_u64(t, META_BY_KEY_TOTAL)?,
            bytes: self.meta_u64(t, META_BY_KEY_BYTES)?,
        })
    }

    /// Durably writes one part of a merge of a layer into table `key_by_key`: each key's history
    /// (`None`: removed), with the table's counts changed by as much as the part changes them
    /// (each key's row before, read in the same transaction, against after), so that the counts
    /// always describe the rows, whatever part a crash stops at. `upto`, given with the merge's
    /// last part, records that the table holds every change up to that revision. Returns the
    /// table's meta after the part.
    pub fn merge_histories<'a>(
        &self,
        part: impl IntoIterator<Item = (&'a [u8], &'a Option<crate::index::KeyHistory>)>,
        upto: Option<i64>,
    ) -> Result<ByKeyMeta, BackendError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_quick_repair(true);
        let meta = self.write_histories(&tx, part, upto)?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(meta)
    }

    /// Writes one part of a merge in `tx` (see [`Backend::merge_histories`]); with `upto`, also
    /// drops the index's log rows up to it (the table now holds their changes).
    fn write_histories<'a>(
        &self,
        tx: &redb::WriteTransaction,
        part: impl IntoIterator<Item = (&'a [u8], &'a Option<crate::index::KeyHistory>)>,
        upto: Option<i64>,
    ) -> Result<ByKeyMeta, BackendError> {
        let mut m = tx.open_table(META).map_err(|e| self.err(e))?;
        // The counts as this transaction sees them, so that each part adds to the last.
        let mut meta = self.by_key_meta_of(&m)?;
        let mut t = tx.open_table(KEY_BY_KEY).map_err(|e| self.err(e))?;
        for (k, h) in part {
            let old = match h {
                Some(h) => t.insert(k, h.encode().as_slice()),
                None => t.remove(k),
            }
            .map_err(|e| self.err(e))?
            .map(|v| history_of(&self.path, k, v.value()))
            .transpose()?;
            for (h, sign) in [(old.as_ref(), -1i64), (h.as_ref(), 1)] {
                if let Some(h) = h {
                    meta.total = meta.total.wrapping_add_signed(sign);
                    meta.live = meta.live.wrapping_add_signed(if h.is_live() { sign } else { 0 });
                    meta.bytes = meta.bytes.wrapping_add_signed(sign * h.record_bytes() as i64);
                }
            }
        }
        if let Some(upto) = upto {
            meta.upto = upto;
            let end = Revision::new(upto, i64::MAX).key_bytes();
            let mut index = tx.open_table(KEY_INDEX).map_err(|e| self.err(e))?;
            index.retain_in::<&[u8], _>(..=&end[..], |_, _| false).map_err(|e| self.err(e))?;
        }
        self.put_by_key_meta(&mut m, &meta)?;
        Ok(meta)
    }

    /// Records what table `key_by_key` holds (a copy's, written before its rows).
    fn put_by_key(&self, meta: &ByKeyMeta) -> Result<(), BackendError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        self.put_by_key_meta(&mut tx.open_table(META).map_err(|e| self.err(e))?, meta)?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records what table `key_by_key` holds; once a merge has completed (`upto` > 0) the file's
    /// `key_index` is the log since it ([`KEY_INDEX_LOG`]).
    fn put_by_key_meta(&self, m: &mut redb::Table<&str, &[u8]>, meta: &ByKeyMeta) -> Result<(), BackendError> {
        if meta.upto > 0 {
            m.insert(META_KEY_INDEX, KEY_INDEX_LOG.to_be_bytes().as_slice()).map_err(|e| self.err(e))?;
        }
        for (k, v) in [
            (META_BY_KEY_UPTO, meta.upto as u64),
            (META_BY_KEY_LIVE, meta.live),
            (META_BY_KEY_TOTAL, meta.total),
            (META_BY_KEY_BYTES, meta.bytes),
        ] {
            m.insert(k, v.to_be_bytes().as_slice()).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The index's log: `f(key, row)` for every row above revision `upto` (the changes table
    /// `key_by_key` does not hold), in revision order. A row that does not decode is an error
    /// naming it.
    pub fn read_log(&self, upto: i64, mut f: impl FnMut(&[u8], IndexRow) -> Result<(), BackendError>) -> Result<(), BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let index = match tx.open_table(KEY_INDEX) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(self.err(e)),
        };
        let start = Revision::new(upto, i64::MAX).key_bytes();
        for item in index.range::<&[u8]>((std::ops::Bound::Excluded(&start[..]), std::ops::Bound::Unbounded)).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (k, v) = (k.value(), v.value());
            let (key, row) =
                IndexRow::decode(k, v).ok_or_else(|| self.err(format!("index row {k:?} in table key_index does not decode")))?;
            f(key, row)?;
        }
        Ok(())
    }

    /// True when table `key_index` holds a row for every record (the file's meta says so).
    pub fn log_complete(&self) -> Result<bool, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let m = tx.open_table(META).map_err(|e| self.err(e))?;
        Ok(self.meta_u64(&m, META_KEY_INDEX)? == KEY_INDEX_COMPLETE)
    }

    /// Marks `key_index` as holding a row for every record, as a Keel that does not keep the
    /// index in the backend does.
    #[cfg(test)]
    pub(crate) fn mark_log_complete_for_test(&self) {
        let tx = self.db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert(META_KEY_INDEX, KEY_INDEX_COMPLETE.to_be_bytes().as_slice()).unwrap();
        tx.commit().unwrap();
    }

    /// Drops table `key_by_key` and what the meta says of it when the file does not mark its
    /// `key_index` as the log since the table's merge ([`KEY_INDEX_LOG`]): a merge that never
    /// completed, or a file an older Keel wrote after one (its log is whole: the table is
    /// stale). Returns whether it dropped anything.
    pub fn drop_stale_histories(&self) -> Result<bool, BackendError> {
        {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            if self.meta_u64(&tx.open_table(META).map_err(|e| self.err(e))?, META_KEY_INDEX)? == KEY_INDEX_LOG {
                return Ok(false);
            }
            let rows = match tx.open_table(KEY_BY_KEY) {
                Ok(t) => t.len().map_err(|e| self.err(e))?,
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(self.err(e)),
            };
            let by_key = self.by_key_meta()?;
            if rows == 0 && by_key == ByKeyMeta::default() {
                return Ok(false);
            }
        }
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_quick_repair(true);
        tx.delete_table(KEY_BY_KEY).map_err(|e| self.err(e))?;
        {
            let mut m = tx.open_table(META).map_err(|e| self.err(e))?;
            for k in [META_BY_KEY_UPTO, META_BY_KEY_LIVE, META_BY_KEY_TOTAL, META_BY_KEY_BYTES] {
                m.remove(k).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        tracing::warn!(path = %self.path.display(), "mvcc: dropped a stale table of key histories (its merge did not complete, or an older Keel wrote the file since); the key index is read from its log");
        Ok(true)
    }

    /// Calls `f` for every stored (revision key, value) in revision order.
    pub fn scan(&self, f: impl FnMut(&[u8], &[u8]) -> Result<(), BackendError>) -> Result<(), BackendError> {
        self.reader()?.scan(f)
    }

    /// Calls `f(table, key, value)` for every key and auxiliary record of one consistent read
    /// (the committed state), then returns that state's meta record.
    pub fn dump(&self, f: impl FnMut(u32, &[u8], &[u8]) -> bool) -> Result<Meta, BackendError> {
        Ok(self.dump_tables(false, f)?.0)
    }

    /// [`Backend::dump`], with the index's tables too when `with_index` (table `key_index` as
    /// [`TABLE_INDEX_ROWS`], `key_by_key` as [`TABLE_BY_KEY`]) and what `key_by_key` holds.
    fn dump_tables(&self, with_index: bool, mut f: impl FnMut(u32, &[u8], &[u8]) -> bool) -> Result<(Meta, ByKeyMeta), BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = self.meta_of(&tx)?;
        let by_key = self.by_key_meta_of(&tx.open_table(META).map_err(|e| self.err(e))?)?;
        let tables: &[(u32, BytesTable)] = if with_index {
            &[(TABLE_KEYS, KEYS), (TABLE_INDEX_ROWS, KEY_INDEX), (TABLE_BY_KEY, KEY_BY_KEY)]
        } else {
            &[(TABLE_KEYS, KEYS)]
        };
        let parts = tx.open_table(PARTS).map_err(|e| self.err(e))?;
        for &(num, def) in tables {
            let t = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) if num != TABLE_KEYS => continue,
                Err(e) => return Err(self.err(e)),
            };
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let v = if num == TABLE_KEYS {
                    parts::record(&parts, k.value(), v.value()).map_err(|e| self.err(e))?
                } else {
                    std::borrow::Cow::Borrowed(v.value())
                };
                if !f(num, k.value(), &v) {
                    return Err(self.err("dump aborted"));
                }
            }
        }
        let t = tx.open_table(AUX).map_err(|e| self.err(e))?;
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !f(TABLE_AUX, k.value().as_bytes(), v.value()) {
                return Err(self.err("dump aborted"));
            }
        }
        Ok((meta, by_key))
    }

    /// Adds dumped records to this (new) backend in one transaction, synced; `meta` (the last
    /// call's) records where the dump was taken. Each batch is synced on its own so that another
    /// file's fsync on the same disk (a WAL's) waits for one batch's writes at most, never for a
    /// whole backend's: a learner that synced only its last batch held the leader's writes up to
    /// 0.8 s (PERFORMANCE.md run 13); callers keep batches to a few MiB.
    pub fn load(&self, records: &[(u32, Vec<u8>, Vec<u8>)], meta: Option<&Meta>) -> Result<(), BackendError> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        // Only the last batch records the allocator state (see [`CommitMode`]): the file is staged,
        // and a crash before its last batch leaves it to be discarded, never opened.
        tx.set_quick_repair(meta.is_some());
        {
            // Each table's entries are gathered first: records come in key order (a dump walks
            // each table in order), and entries in order after a table's last are appended
            // through a cursor, at about half the CPU of inserting them one by one (1,000,000
            // records of 1 KiB: 7.3 s of user time -> 4.1, `examples/load_cost.rs`).
            let (mut key_entries, mut part_entries, mut rows, mut by_key_entries) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut aux = tx.open_table(AUX).map_err(|e| self.err(e))?;
            for (table, k, v) in records {
                match *table {
                    TABLE_KEYS => {
                        let (entry, parts) = parts::split(k, v).map_err(|e| self.err(e))?;
                        key_entries.push((Cow::Borrowed(k.as_slice()), entry));
                        part_entries.extend(parts.into_iter().map(|(pk, chunk)| (Cow::Owned(pk), Cow::Borrowed(chunk))));
                        let (key, row) = self.index_entry(k, v)?;
                        rows.push((Cow::Owned(row.rev.key_bytes().to_vec()), Cow::Owned(row.encode(&key))));
                    }
                    TABLE_INDEX_ROWS => rows.push((Cow::Borrowed(k.as_slice()), Cow::Borrowed(v.as_slice()))),
                    TABLE_BY_KEY => by_key_entries.push((Cow::Borrowed(k.as_slice()), Cow::Borrowed(v.as_slice()))),
                    TABLE_AUX => {
                        let name = std::str::from_utf8(k).map_err(|_| self.err("aux record name is not UTF-8"))?;
                        aux.insert(name, v.as_slice()).map_err(|e| self.err(e))?;
                    }
                    other => return Err(self.err(format!("unknown table {other} in snapshot"))),
                }
            }
            let mut keys = tx.open_table(KEYS).map_err(|e| self.err(e))?;
            let mut parts = tx.open_table(PARTS).map_err(|e| self.err(e))?;
            if !append_in_order(&mut keys, &key_entries).map_err(|e| self.err(e))? {
                // Not after the table's last: stored one by one (parts of replaced records go).
                for (_, k, v) in records.iter().filter(|r| r.0 == TABLE_KEYS) {
                    parts::put(&mut keys, &mut parts, k, v).map_err(|e| self.err(e))?;
                }
            } else if !append_in_order(&mut parts, &part_entries).map_err(|e| self.err(e))? {
                insert_each(&mut parts, &part_entries).map_err(|e| self.err(e))?;
            }
            for (def, entries) in [(KEY_INDEX, &rows), (KEY_BY_KEY, &by_key_entries)] {
                let mut t = tx.open_table(def).map_err(|e| self.err(e))?;
                if !append_in_order(&mut t, entries).map_err(|e| self.err(e))? {
                    insert_each(&mut t, entries).map_err(|e| self.err(e))?;
                }
            }
        }
        if let Some(meta) = meta {
            self.put_meta(&tx, meta)?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Writes a compact copy of the committed state to a new backend file at `dest` (replaced if
    /// present) and returns the copy's meta record. Reads one consistent state; the store may
    /// keep committing meanwhile.
    ///
    /// With `with_index` the index's tables are copied as they are (an index kept in the backend:
    /// its histories and its log, which holds rows of records already deleted); else the copy's
    /// log is built from its records.
    pub fn copy_to(&self, dest: &Path, with_index: bool) -> Result<(Backend, Meta), BackendError> {
        let started = std::time::Instant::now();
        let _ = keel_reclaim::remove(dest);
        let out = Backend::open(dest)?;
        let mut batch: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::with_capacity(COPY_BATCH);
        let mut bytes = 0usize;
        let mut failed = None;
        let dumped = self.dump_tables(with_index, |t, k, v| {
            batch.push((t, k.to_vec(), v.to_vec()));
            bytes += k.len() + v.len();
            if batch.len() >= COPY_BATCH || bytes >= COPY_BATCH_BYTES {
                // Each batch is synced on its own: one huge flush at the end would hold up
                // the WAL's fsyncs on the same disk.
                bytes = 0;
                if let Err(e) = out.load(&batch, None) {
                    failed = Some(e);
                    return false;
                }
                batch.clear();
            }
            true
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let (meta, by_key) = dumped?;
        if with_index {
            out.put_by_key(&by_key)?;
        }
        out.load(&batch, Some(&meta))?;
        tracing::debug!(path = %dest.display(), took = ?started.elapsed(), "copied the backend's records");
        // redb preallocates 1 MiB and grows by regions: the copy is shrunk to the pages it uses,
        // as a defragmented bbolt file is (a small store's file is 20 kB, not 1 MB).
        let mut db =
            std::sync::Arc::try_unwrap(out.db).map_err(|_| BackendError { path: dest.to_path_buf(), msg: "the copy is shared".into() })?;
        let compacting = std::time::Instant::now();
        db.compact().map_err(|e| BackendError { path: dest.to_path_buf(), msg: e.to_string() })?;
        tracing::debug!(path = %dest.display(), took = ?compacting.elapsed(), "compacted the copy");
        Ok((Backend { db: std::sync::Arc::new(db), retire: Default::default(), path: out.path, repaired: false }, meta))
    }

    /// A CRC-32C over every key record and auxiliary record of the committed state (the
    /// Maintenance.Hash of etcd: the same on members with the same backend content).
    pub fn hash(&self) -> Result<(u32, Meta), BackendError> {
        let mut h = 0u32;
        let meta = self.dump(|t, k, v| {
            h = crc32c::crc32c_append(h, &t.to_be_bytes());
            h = crc32c::crc32c_append(h, k);
            h = crc32c::crc32c_append(h, v);
            true
        })?;
        Ok((h, meta))
    }

    /// Marks this backend's file as about to be replaced (renamed over): once this handle, its
    /// clones and its readers are all gone, the file's blocks are given back in small steps
    /// rather than all at once when it closes. Holds a descriptor of its own on the file, so it
    /// is called before the rename; a file still named when the last handle goes is left whole.
    pub fn retire(&self) {
        match std::fs::OpenOptions::new().write(true).open(&self.path) {
            Ok(f) => {
                if let Ok(mut held) = self.retire.0.lock() {
                    *held = Some(f);
                }
            }
            // The file is then freed at once when it closes, as any other.
            Err(e) => tracing::debug!(path = %self.path.display(), error = %e, "cannot hold a replaced backend file to free it in steps"),
        }
    }

    /// Moves this backend's file to `dest` (an atomic rename over the old file) and keeps using it.
    pub fn rename_to(mut self, dest: &Path) -> Result<Backend, BackendError> {
        std::fs::rename(&self.path, dest).map_err(|e| self.err(format!("rename to {}: {e}", dest.display())))?;
        sync_parent(dest)?;
        self.path = dest.to_path_buf();
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the file physically allocated (etcd's dbSize), at most its length. redb grows
    /// a file by doubling it, then a 4 GiB region at a time, leaving the new tail unwritten
    /// (sparse): counted, it made a defragmented copy of a 1 GB store's 2.3 GB file 2.9 GB
    /// long, with 1.4 GB of it allocated.
    pub fn size(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map(|m| m.len().min(m.blocks() * 512)).unwrap_or(0)
    }

    /// Bytes of the file's pages in use by the tables (the rest is free space a defragmentation
    /// gives back): etcd's "in use", bbolt's pages less its free list. Counted by walking every
    /// table in one read transaction: a call costs a read of the whole file but holds nothing
    /// back (redb's own count of allocated pages needs a write transaction, which would stop
    /// every commit for the walk: a second per GB after each start). redb's own records (its
    /// allocator state and table directory, a few pages) are left out.
    pub fn pages_in_use(&self) -> Result<u64, BackendError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut bytes = 0u64;
        for handle in tx.list_tables().map_err(|e| self.err(e))? {
            let st = tx.open_untyped_table(handle).map_err(|e| self.err(e))?.stats().map_err(|e| self.err(e))?;
            bytes += st.stored_bytes() + st.metadata_bytes() + st.fragmented_bytes();
        }
        Ok(bytes)
    }
}

/// Takes the rows [`Backend::read_index`] reads.
pub trait IndexSink {
    /// About `rows` rows are coming (told once before the first, where the count is known).
    fn reserve(&mut self, _rows: usize) {}
    /// One record's row; `key` is its user key.
    fn row(&mut self, key: &[u8], row: IndexRow);
    /// Forgets every row given so far (the persisted index proved damaged part way through).
    fn clear(&mut self);
}

/// How [`Backend::read_index`] read the key index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexSource {
    /// From the persisted index's rows.
    Persisted,
    /// From the records, after which the persisted index was built.
    Built,
}

impl IndexSource {
    pub fn name(self) -> &'static str {
        match self {
            IndexSource::Persisted => "persisted",
            IndexSource::Built => "built from the records",
        }
    }
}

/// What the in-memory index keeps of one `key` record: a row of the persisted key index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRow {
    pub rev: Revision,
    pub tombstone: bool,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    /// Bytes of the record (revision key and value), for the store's size accounting.
    pub size: u32,
}

impl IndexRow {
    /// Encoded length before the user key: tombstone (1), create revision, version, lease (8
    /// each, big-endian), size (4).
    const FIXED: usize = 29;

    /// The row's value: the fixed fields, then `key`.
    fn encode(&self, key: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::FIXED + key.len());
        b.push(self.tombstone as u8);
        b.extend_from_slice(&self.create_revision.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.lease.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(key);
        b
    }

    /// The user key and row at revision key `row_key` holding `v`; None when either is malformed.
    fn decode<'a>(row_key: &[u8], v: &'a [u8]) -> Option<(&'a [u8], IndexRow)> {
        let (rev, false) = Revision::from_key(row_key)? else { return None };
        if v.len() < Self::FIXED || v[0] > 1 {
            return None;
        }
        let i64_at = |i: usize| v[i..i + 8].try_into().ok().map(i64::from_be_bytes);
        let row = IndexRow {
            rev,
            tombstone: v[0] == 1,
            create_revision: i64_at(1)?,
            version: i64_at(9)?,
            lease: i64_at(17)?,
            size: u32::from_be_bytes(v[25..29].try_into().ok()?),
        };
        Some((&v[Self::FIXED..], row))
    }
}

/// The fields of a stored mvccpb.KeyValue the key index keeps: the value (field 5) and
/// mod_revision (3, the record's own key) are skipped by the decoder, not copied.
#[derive(Clone, PartialEq, prost::Message)]
struct IndexFields {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(int64, tag = "2")]
    create_revision: i64,
    #[prost(int64, tag = "4")]
    version: i64,
    #[prost(int64, tag = "6")]
    lease: i64,
}

/// A read-only view of the committed key table (records read whole, parts joined).
pub struct Reader {
    table: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    parts: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    path: PathBuf,
    /// The database stays open while this reads it (redb's tables fail once it closes, as when
    /// a defragmentation swaps the file under a compaction's hash), and a retired file is given
    /// back only after. In this order, after the tables.
    _db: std::sync::Arc<Database>,
    _file: std::sync::Arc<Retire>,
}

impl Reader {
    fn err(&self, e: impl std::fmt::Display) -> BackendError {
        BackendError { path: self.path.clone(), msg: e.to_string() }
    }

    /// The record at revision key `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        let Some(v) = self.table.get(key).map_err(|e| self.err(e))? else { return Ok(None) };
        Ok(Some(parts::record(&self.parts, key, v.value()).map_err(|e| self.err(e))?.into_owned()))
    }

    /// Calls `f` for every (revision key, record) of this read, in revision order.
    pub fn scan(&self, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), BackendError>) -> Result<(), BackendError> {
        for item in self.table.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let v = parts::record(&self.parts, k.value(), v.value()).map_err(|e| self.err(e))?;
            f(k.value(), &v)?;
        }
        Ok(())
    }
}

/// A read-only view of the committed key histories (table `key_by_key`): the base of a
/// [`crate::layered::Layers`] index. A row that does not decode is reported with its key.
pub struct Histories {
    table: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    path: PathBuf,
    /// As [`Reader`]'s.
    _db: std::sync::Arc<Database>,
    _file: std::sync::Arc<Retire>,
}

impl Histories {
    fn err(&self, e: impl std::fmt::Display) -> BackendError {
        BackendError { path: self.path.clone(), msg: e.to_string() }
    }
}

/// The history a `key_by_key` row of `key` holds, in the backend at `path`; an error naming
/// the key and the table when it does not decode.
fn history_of(path: &Path, key: &[u8], v: &[u8]) -> Result<crate::index::KeyHistory, BackendError> {
    crate::index::KeyHistory::decode(v).ok_or_else(|| BackendError {
        path: path.to_path_buf(),
        msg: format!("undecodable history of key \"{}\" in table key_by_key", key.escape_ascii()),
    })
}

impl crate::layered::Base for Histories {
    fn get(&self, key: &[u8]) -> Result<Option<crate::index::KeyHistory>, BackendError> {
        let Some(t) = &self.table else { return Ok(None) };
        match t.get(key).map_err(|e| self.err(e))? {
            Some(v) => history_of(&self.path, key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn range<'a>(&'a self, lo: std::ops::Bound<&[u8]>, hi: std::ops::Bound<&[u8]>) -> Result<crate::layered::BaseRange<'a>, BackendError> {
        let Some(t) = &self.table else { return Ok(Box::new(std::iter::empty())) };
        let it = t.range::<&[u8]>((lo, hi)).map_err(|e| self.err(e))?;
        Ok(Box::new(it.map(move |item| {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = k.value().to_vec();
            let h = history_of(&self.path, &key, v.value())?;
            Ok((key, h))
        })))
    }
}

/// Entries of a table gathered for one transaction.
type Entries<'a> = [(Cow<'a, [u8]>, Cow<'a, [u8]>)];

/// Appends `entries` to `table` through a cursor at its end when they are in strictly
/// increasing key order after the table's last key; false, with nothing written, when they are
/// not.
fn append_in_order(table: &mut redb::Table<&[u8], &[u8]>, entries: &Entries) -> Result<bool, redb::Error> {
    let Some((first, _)) = entries.first() else { return Ok(true) };
    let in_order = entries.windows(2).all(|w| w[0].0 < w[1].0);
    let after_last = match table.last()? {
        Some((last, _)) => last.value() < first.as_ref(),
        None => true,
    };
    if !(in_order && after_last) {
        return Ok(false);
    }
    let mut cursor = table.upper_bound_mut(std::ops::Bound::<&[u8]>::Unbounded)?;
    for (k, v) in entries {
        cursor.insert_before(k.as_ref(), v.as_ref())?;
    }
    cursor.close()?;
    Ok(true)
}

/// Inserts `entries` into `table` one by one, in their order (a later one replaces an earlier
/// one with the same key).
fn insert_each(table: &mut redb::Table<&[u8], &[u8]>, entries: &Entries) -> Result<(), redb::Error> {
    for (k, v) in entries {
        table.insert(k.as_ref(), v.as_ref())?;
    }
    Ok(())
}

/// Reading the persisted key index from a cold page cache: its pages lie among the records'
/// pages, and one reader walking them waits for each in turn. When the first rows come slowly,
/// helper threads walk the rest of the table ahead of the reader, each its own part of the
/// revisions, so that the disk serves several reads at once and the reader finds their pages
/// cached. A hint only: the helpers read in their own transactions, keep nothing, and stop once
/// the reader has passed them or is done.
mod prefetch {
    use super::{ReadableDatabase, Revision, KEY_INDEX};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::time::Duration;

    /// Rows read before the reader decides whether the table is cold (and how often it says
    /// where it is).
    pub(super) const PROBE_ROWS: usize = 16_384;
    /// Longer than this for the first [`PROBE_ROWS`] rows: read from the disk (from the page
    /// cache they take about 2 ms).
    pub(super) const COLD: Duration = Duration::from_millis(25);
    /// Helper threads walking ahead of the reader (the disk's parallelism, not the cores': they
    /// wait on reads).
    const HELPERS: i64 = 3;

    /// The reader's position and whether it is done, shared with the helpers.
    #[derive(Default)]
    pub(super) struct Reader {
        at: AtomicI64,
        done: AtomicBool,
    }

    impl Reader {
        /// The reader reached main revision `rev`.
        pub(super) fn at(&self, rev: i64) {
            self.at.store(rev, Ordering::Relaxed);
        }

        /// The reader stopped: the helpers stop too.
        pub(super) fn done(&self) {
            self.done.store(true, Ordering::Relaxed);
        }

        /// Starts the helpers on revisions `from..=last` in [`HELPERS`] + 1 equal parts, each
        /// but the first (the reader's own) walked by one helper, which answers how many rows it
        /// walked.
        pub(super) fn start<'scope, 'env: 'scope>(
            &'env self,
            scope: &'scope std::thread::Scope<'scope, 'env>,
            db: &'env redb::Database,
            from: i64,
            last: i64,
        ) -> Vec<std::thread::ScopedJoinHandle<'scope, usize>> {
            let part = (last - from) / (HELPERS + 1) + 1;
            tracing::debug!(from, last, helpers = HELPERS, "the key index is read from the disk: reading ahead");
            let mut helpers = Vec::new();
            for i in 1..=HELPERS {
                let start = from.saturating_add(part.saturating_mul(i));
                if start > last {
                    break;
                }
                let end = start.saturating_add(part);
                match std::thread::Builder::new().name("keel-index-ahead".into()).spawn_scoped(scope, move || self.walk(db, start, end)) {
                    Ok(h) => helpers.push(h),
                    Err(_) => break,
                }
            }
            helpers
        }

        /// Walks the rows of main revisions `start..end`, which loads their pages, until the
        /// reader passes the walk's position or is done; answers the rows walked.
        fn walk(&self, db: &redb::Database, start: i64, end: i64) -> usize {
            let Ok(tx) = db.begin_read() else { return 0 };
            let Ok(table) = tx.open_table(KEY_INDEX) else { return 0 };
            let (lo, hi) = (start.to_be_bytes(), end.to_be_bytes());
            let Ok(range) = table.range::<&[u8]>(lo.as_slice()..hi.as_slice()) else { return 0 };
            let mut walked = 0;
            for item in range {
                if walked % 1024 == 0 {
                    let main = item.as_ref().ok().and_then(|(k, _)| Revision::from_key(k.value())).map(|(r, _)| r.main);
                    if self.done.load(Ordering::Relaxed) || main.is_none_or(|m| self.at.load(Ordering::Relaxed) >= m) {
                        break;
                    }
                }
                walked += 1;
            }
            walked
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::revision::Revision;

    /// A `key` record of `key` put at `main` (its first version), with `len` bytes of value.
    fn record(key: &[u8], main: i64, len: usize) -> Vec<u8> {
        keel_proto::mvccpb::KeyValue {
            key: key.to_vec(),
            create_revision: main,
            mod_revision: main,
            version: 1,
            value: vec![b'v'; len],
            lease: 0,
        }
        .encode_to_vec()
    }

    /// The child half of the crash tests: commits to the backend at `KEEL_CRASH_DB` (through
    /// [`Backend::commit`], or with a plain redb transaction when `KEEL_CRASH_PLAIN` is set), then
    /// aborts the process: no clean shutdown.
    #[test]
    fn crash_child() {
        let Ok(path) = std::env::var("KEEL_CRASH_DB") else { return };
        let b = Backend::open(Path::new(&path)).unwrap();
        let mut changes = Changes::new();
        for i in 0..1000u32 {
            changes.insert(Revision { main: i as i64 + 1, sub: 0 }.to_key(false), Some(record(&i.to_be_bytes(), i as i64 + 1, 500).into()));
        }
        b.commit(&changes, &BTreeMap::new(), &Meta { consistent_index: 9, term: 1, current_rev: 1000, compacted_rev: 0 }).unwrap();
        if std::env::var("KEEL_CRASH_PLAIN").is_ok() {
            let tx = b.db.begin_write().unwrap();
            tx.open_table(KEYS).unwrap().insert(b"x".as_slice(), b"y".as_slice()).unwrap();
            tx.commit().unwrap();
        }
        std::process::abort();
    }

    /// A merge written in parts: the revision it reached is recorded with its last part only,
    /// the counts with every part; a part that removes keys takes them out of the counts.
    #[test]
    fn a_merge_records_its_revision_with_its_last_part() {
        use crate::index::KeyHistory;
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(&dir.path().join("db")).unwrap();
        assert_eq!(b.by_key_meta().unwrap(), ByKeyMeta::default());
        let live = |main: i64| {
            let mut h = KeyHistory::default();
            h.put(Revision::new(main, 0), 0, 100);
            Some(h)
        };
        let mut deleted = live(3);
        if let Some(h) = deleted.as_mut() {
            h.tombstone(Revision::new(4, 0), 10);
        }
        let m = b.merge_histories([(b"a".as_slice(), &live(2)), (b"b".as_slice(), &deleted)], None).unwrap();
        assert_eq!(m, ByKeyMeta { upto: 0, live: 1, total: 2, bytes: 210 });
        let m = b.merge_histories([(b"c".as_slice(), &live(5))], Some(5)).unwrap();
        assert_eq!(m, ByKeyMeta { upto: 5, live: 2, total: 3, bytes: 310 });
        // The next merge: b compacted away, a written again; not finished.
        let m = b.merge_histories([(b"b".as_slice(), &None), (b"a".as_slice(), &live(6))], None).unwrap();
        assert_eq!(m, ByKeyMeta { upto: 5, live: 2, total: 2, bytes: 200 });
        assert_eq!(b.by_key_meta().unwrap(), m, "the meta records read back");
    }

    /// A history row that does not decode is reported with its table and key, by a lookup and
    /// by a range, and not taken for a history.
    #[test]
    fn an_undecodable_history_is_reported_with_its_key() {
        use crate::layered::Base;
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(&dir.path().join("db")).unwrap();
        assert!(b.histories().unwrap().get(b"k1").unwrap().is_none(), "no table yet: no history");
        let tx = b.db.begin_write().unwrap();
        tx.open_table(KEY_BY_KEY).unwrap().insert(b"k1".as_slice(), [1u8; 30].as_slice()).unwrap();
        tx.commit().unwrap();
        let h = b.histories().unwrap();
        let e = h.get(b"k1").unwrap_err();
        assert!(e.to_string().contains("undecodable history of key \"k1\" in table key_by_key"), "{e}");
        let mut all = h.range(std::ops::Bound::Unbounded, std::ops::Bound::Unbounded).unwrap();
        let e = all.next().unwrap().unwrap_err();
        assert!(e.to_string().contains("\"k1\""), "{e}");
    }

    /// Runs [`crash_child`] in a child process on a fresh backend; returns its path.
    fn crashed_backend(dir: &Path, plain: bool) -> PathBuf {
        crashed_in(dir, "backend::tests::crash_child", plain)
    }

    /// Runs the test `child` in a child process with `KEEL_CRASH_DB` set to a path in `dir`,
    /// which it returns.
    fn crashed_in(dir: &Path, child: &str, plain: bool) -> PathBuf {
        let path = dir.join("db");
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", child, "--nocapture", "--test-threads=1"]).env("KEEL_CRASH_DB", &path);
        if plain {
            cmd.env("KEEL_CRASH_PLAIN", "1");
        }
        let st = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().unwrap();
        assert!(!st.success(), "the child must die without a clean shutdown");
        path
    }

    /// After a crash, a backend whose last commit was Keel's opens without walking the file
    /// (redb's recorded allocator state, quick repair), with what was committed.
    #[test]
    fn a_crash_after_a_commit_needs_no_full_repair() {
        let d = tempfile::tempdir().unwrap();
        let path = crashed_backend(d.path(), false);
        let b = Backend::open(&path).unwrap();
        assert!(!b.repaired(), "opened with the recorded allocator state");
        assert_eq!(b.read_meta().unwrap().consistent_index, 9);
        assert_eq!(
            b.reader().unwrap().get(&Revision { main: 1000, sub: 0 }.to_key(false)).unwrap(),
            Some(record(&999u32.to_be_bytes(), 1000, 500))
        );
        // The negative control: a last commit that did not record the state is walked.
        let d2 = tempfile::tempdir().unwrap();
        let plain = crashed_backend(d2.path(), true);
        let b2 = Backend::open(&plain).unwrap();
        assert!(b2.repaired(), "a commit without quick repair leaves a full repair to the next open");
        assert_eq!(b2.read_meta().unwrap().consistent_index, 9);
    }

    /// A defragmented copy holds the committed records and is no larger than the pages they use
    /// (redb's fresh file is 1 MiB; etcd's defragmented small store is 20 kB).
    #[test]
    fn a_copy_is_compact_and_complete() {
        let d = tempfile::tempdir().unwrap();
        let src = Backend::open(&d.path().join("db")).unwrap();
        let records: Vec<(u32, Vec<u8>, Vec<u8>)> =
            (1..=100i64).map(|i| (TABLE_KEYS, Revision::new(i, 0).to_key(false), record(&i.to_be_bytes(), i, 100))).collect();
        src.load(&records, Some(&Meta { consistent_index: 7, term: 2, current_rev: 101, compacted_rev: 0 })).unwrap();
        let (copy, meta) = src.copy_to(&d.path().join("copy"), false).unwrap();
        assert_eq!((meta.consistent_index, meta.current_rev), (7, 101));
        assert_eq!(copy.hash().unwrap().0, src.hash().unwrap().0, "the same records");
        let size = std::fs::metadata(d.path().join("copy")).unwrap().len();
        assert!(size <= 64 << 10, "a copy of 100 small records takes {size} bytes");
    }

    /// Records of 16 KiB (etcd's "big values" shape) take about their own size on disk, not the
    /// 32 KiB page each would take whole; they read back through every path (get, scan, dump,
    /// a copy, the index built from the records), and deleting them frees their parts.
    #[test]
    fn long_records_take_their_size_and_read_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let b = Backend::open(&d.path().join("db")).unwrap();
        let n = 2000i64;
        let key = |i: i64| Revision::new(i, 0).to_key(false);
        let mut changes = Changes::new();
        let mut bytes = 0usize;
        for i in 1..=n {
            let v = record(&i.to_be_bytes(), i, 16 << 10);
            bytes += v.len();
            changes.insert(key(i), Some(v.into()));
        }
        b.commit(&changes, &BTreeMap::new(), &Meta { consistent_index: 1, term: 1, current_rev: n, compacted_rev: 0 }).unwrap();
        let used = b.pages_in_use().unwrap();
        assert!((used as f64) < bytes as f64 * 1.1, "{bytes} bytes of records use {used} bytes of pages");
        assert_eq!(b.reader().unwrap().get(&key(7)).unwrap(), Some(record(&7i64.to_be_bytes(), 7, 16 << 10)));
        let mut seen = 0;
        b.scan(|k, v| {
            seen += 1;
            assert_eq!((k, v), (key(seen).as_slice(), record(&seen.to_be_bytes(), seen, 16 << 10).as_slice()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, n);
        let (copy, _) = b.copy_to(&d.path().join("copy"), false).unwrap();
        assert_eq!(copy.hash().unwrap().0, b.hash().unwrap().0, "the copy holds the same records");
        assert_eq!(copy.reader().unwrap().get(&key(n)).unwrap(), Some(record(&n.to_be_bytes(), n, 16 << 10)));
        // The index built from the records counts each record's whole size.
        drop_index(&b);
        let (how, rows) = read(&b);
        assert_eq!((how, rows.len()), (IndexSource::Built, n as usize));
        assert_eq!(rows.iter().map(|(_, r)| r.size as usize).sum::<usize>(), bytes + n as usize * key(1).len());
        // Deleting every other record frees its parts: the pages in use fall by about half.
        let dels: Changes = (1..=n).step_by(2).map(|i| (key(i), None)).collect();
        b.commit(&dels, &BTreeMap::new(), &Meta { consistent_index: 2, term: 1, current_rev: n, compacted_rev: n }).unwrap();
        let left = b.pages_in_use().unwrap();
        assert!((left as f64) < used as f64 * 0.6, "{left} bytes of pages in use after deleting half of {used}");
        assert_eq!(b.reader().unwrap().get(&key(1)).unwrap(), None);
        assert_eq!(b.reader().unwrap().get(&key(2)).unwrap(), Some(record(&2i64.to_be_bytes(), 2, 16 << 10)));
    }

    /// A replaced backend's file is given back only once its last handle and reader are gone:
    /// a descriptor kept on it sees it whole while a reader is alive (the reader still reads
    /// it), then emptied; the new file at the path is untouched.
    #[test]
    fn a_retired_file_is_emptied_once_nothing_reads_it() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let old = Backend::open(&path).unwrap();
        let mut changes = Changes::new();
        for i in 1..=200i64 {
            changes.insert(Revision::new(i, 0).to_key(false), Some(record(&i.to_be_bytes(), i, 9000).into()));
        }
        old.commit(&changes, &BTreeMap::new(), &Meta { consistent_index: 1, term: 1, current_rev: 200, compacted_rev: 0 }).unwrap();
        let watcher = std::fs::File::open(&path).unwrap();
        let size = watcher.metadata().unwrap().len();
        let reader = old.reader().unwrap();
        let new = Backend::open(&d.path().join("new")).unwrap();
        old.retire();
        let new = new.rename_to(&path).unwrap();
        drop(old);
        assert_eq!(watcher.metadata().unwrap().len(), size, "given back while a reader was open");
        assert_eq!(reader.get(&Revision::new(7, 0).to_key(false)).unwrap(), Some(record(&7i64.to_be_bytes(), 7, 9000)));
        drop(reader);
        keel_reclaim::wait_idle();
        assert_eq!(watcher.metadata().unwrap().len(), 0, "the replaced file was not given back");
        assert!(new.read_meta().is_ok());
        assert!(new.size() > 0 && new.size() <= std::fs::metadata(&path).unwrap().len());
    }

    /// A backend retired but never replaced (the rename failed) keeps its file whole.
    #[test]
    fn a_retired_file_still_named_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let b = Backend::open(&path).unwrap();
        let mut changes = Changes::new();
        changes.insert(Revision::new(2, 0).to_key(false), Some(record(b"k", 2, 100).into()));
        let meta = Meta { consistent_index: 3, term: 1, current_rev: 2, compacted_rev: 0 };
        b.commit(&changes, &BTreeMap::new(), &meta).unwrap();
        b.retire();
        drop(b);
        keel_reclaim::wait_idle();
        let b = Backend::open(&path).unwrap();
        assert_eq!(b.read_meta().unwrap().consistent_index, 3);
        assert_eq!(b.reader().unwrap().get(&Revision::new(2, 0).to_key(false)).unwrap(), Some(record(b"k", 2, 100)));
    }

    /// Loaded records land as committed ones do, whether they come in order after what the
    /// file holds (appended through cursors) or not (stored one by one, a replaced record's parts
    /// dropped): same hash, same index rows, the same parts.
    #[test]
    fn loads_in_order_and_out_of_order_match_commits() {
        let d = tempfile::tempdir().unwrap();
        let key = |i: i64| Revision::new(i, 0).to_key(false);
        // Every third record in parts; the last batch goes back before the first's end and
        // replaces a long record by a short one and a short one by a long one.
        let val = |i: i64, round: usize| record(&i.to_be_bytes(), i, if (i as usize + round).is_multiple_of(3) { 9000 } else { 100 });
        let batches: Vec<Vec<(i64, usize)>> =
            vec![(10..=20).map(|i| (i, 0)).collect(), (21..=25).map(|i| (i, 0)).collect(), vec![(5, 0), (6, 0), (12, 1), (15, 1), (7, 0)]];
        let loaded = Backend::open(&d.path().join("loaded")).unwrap();
        let committed = Backend::open(&d.path().join("committed")).unwrap();
        for (n, batch) in batches.iter().enumerate() {
            let records: Vec<(u32, Vec<u8>, Vec<u8>)> = batch.iter().map(|&(i, r)| (TABLE_KEYS, key(i), val(i, r))).collect();
            let meta = Meta { consistent_index: n as u64 + 1, term: 1, current_rev: 25, compacted_rev: 0 };
            loaded.load(&records, Some(&meta)).unwrap();
            let changes: Changes = batch.iter().map(|&(i, r)| (key(i), Some(val(i, r).into()))).collect();
            committed.commit(&changes, &BTreeMap::new(), &meta).unwrap();
        }
        assert_eq!(loaded.hash().unwrap(), committed.hash().unwrap());
        assert_eq!(read(&loaded), read(&committed));
        let parts = |b: &Backend| {
            let tx = b.db.begin_read().unwrap();
            let t = tx.open_table(PARTS).unwrap();
            t.iter().unwrap().map(|e| e.unwrap().0.value().to_vec()).collect::<Vec<_>>()
        };
        assert_eq!(parts(&loaded), parts(&committed));
        assert!(!parts(&loaded).is_empty());
        for (i, r) in [(12, 1), (15, 1), (7, 0), (25, 0)] {
            assert_eq!(loaded.reader().unwrap().get(&key(i)).unwrap(), Some(val(i, r)));
        }
    }

    /// What [`Backend::read_index`] hands out, and how it read it.
    #[derive(Default, Debug, PartialEq)]
    struct Collected(Vec<(Vec<u8>, IndexRow)>);

    impl IndexSink for Collected {
        fn row(&mut self, key: &[u8], row: IndexRow) {
            self.0.push((key.to_vec(), row));
        }
        fn clear(&mut self) {
            self.0.clear();
        }
    }

    fn read(b: &Backend) -> (IndexSource, Vec<(Vec<u8>, IndexRow)>) {
        let mut c = Collected::default();
        let how = b.read_index(&mut c).unwrap();
        (how, c.0)
    }

    /// Makes `b` look written by a Keel without the persisted index: no table, no mark.
    fn drop_index(b: &Backend) {
        let tx = b.db.begin_write().unwrap();
        tx.delete_table(KEY_INDEX).unwrap();
        tx.open_table(META).unwrap().remove(META_KEY_INDEX).unwrap();
        tx.commit().unwrap();
    }

    /// Puts of keys k0..k9 over revisions 2..=41, tombstones of some, then a compaction-like
    /// removal of the oldest records: what a store's batches do.
    fn history(b: &Backend) {
        let mut changes = Changes::new();
        for main in 2..=41i64 {
            let key = format!("k{}", main % 10);
            let tomb = main % 7 == 0;
            let v = keel_proto::mvccpb::KeyValue {
                key: key.into_bytes(),
                create_revision: main - 1,
                mod_revision: main,
                version: 2,
                lease: main % 3,
                value: b"x".to_vec(),
            };
            changes.insert(Revision::new(main, 0).to_key(tomb), Some(v.encode_to_vec().into()));
        }
        b.commit(&changes, &BTreeMap::new(), &Meta { consistent_index: 1, term: 1, current_rev: 41, compacted_rev: 0 }).unwrap();
        let mut removed = Changes::new();
        for main in 2..=12i64 {
            removed.insert(Revision::new(main, 0).to_key(main % 7 == 0), None);
        }
        b.commit(&removed, &BTreeMap::new(), &Meta { consistent_index: 2, term: 1, current_rev: 41, compacted_rev: 12 }).unwrap();
    }

    /// The persisted index hands out, without reading a value, exactly the rows the records
    /// give; a file without it (an older Keel's) or with a damaged one gets it built.
    #[test]
    fn the_persisted_index_matches_the_records() {
        let d = tempfile::tempdir().unwrap();
        let b = Backend::open(&d.path().join("db")).unwrap();
        history(&b);
        let (how, persisted) = read(&b);
        assert_eq!(how, IndexSource::Persisted);
        assert_eq!(persisted.len(), 29, "40 records less the 11 removed");
        assert!(persisted.iter().any(|(_, r)| r.tombstone) && persisted.iter().any(|(_, r)| r.lease == 2));
        drop_index(&b);
        let (how, from_records) = read(&b);
        assert_eq!(how, IndexSource::Built);
        assert_eq!(from_records, persisted);
        assert_eq!(read(&b), (IndexSource::Persisted, persisted.clone()), "built for the next start");
        // A row missing (the counts differ) or damaged: built again, the same.
        let tx = b.db.begin_write().unwrap();
        tx.open_table(KEY_INDEX).unwrap().remove(&Revision::new(20, 0).key_bytes()[..]).unwrap();
        tx.commit().unwrap();
        assert_eq!(read(&b), (IndexSource::Built, persisted.clone()));
        let tx = b.db.begin_write().unwrap();
        tx.open_table(KEY_INDEX).unwrap().insert(&Revision::new(40, 0).key_bytes()[..], b"short".as_slice()).unwrap();
        tx.commit().unwrap();
        assert_eq!(read(&b), (IndexSource::Built, persisted.clone()));
        assert_eq!(read(&b), (IndexSource::Persisted, persisted));
    }

    /// The helpers reading a cold index ahead walk the parts after the reader's, and stop once
    /// the reader is done or has passed them.
    #[test]
    fn the_index_read_ahead_walks_the_later_parts_and_stops_behind_the_reader() {
        let d = tempfile::tempdir().unwrap();
        let b = Backend::open(&d.path().join("db")).unwrap();
        let tx = b.db.begin_write().unwrap();
        {
            let mut t = tx.open_table(KEY_INDEX).unwrap();
            for main in 1..=40_000i64 {
                t.insert(&Revision::new(main, 0).key_bytes()[..], b"row".as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
        let walked = |at: i64, done: bool| -> Vec<usize> {
            let reader = prefetch::Reader::default();
            reader.at(at);
            if done {
                reader.done();
            }
            std::thread::scope(|s| reader.start(s, &b.db, 1, 40_000).into_iter().map(|h| h.join().unwrap()).collect())
        };
        assert_eq!(walked(0, false), vec![10_000, 10_000, 10_000], "each helper its quarter, the reader the first");
        assert_eq!(walked(0, true), vec![0, 0, 0], "the reader is done");
        let behind = walked(25_000, false);
        assert_eq!(behind[..2], [0, 0], "the reader has passed the second and third quarters");
        assert_eq!(behind[2], 10_000);
    }

    /// The child half of [`a_crash_while_the_index_is_built_leaves_it_to_be_built_again`]:
    /// 1,000 records without an index, then a build in batches of 100 that dies after the third.
    #[test]
    fn index_build_crash_child() {
        let Ok(path) = std::env::var("KEEL_CRASH_DB") else { return };
        let b = Backend::open(Path::new(&path)).unwrap();
        let mut changes = Changes::new();
        for i in 0..1000u32 {
            changes.insert(Revision::new(i as i64 + 1, 0).to_key(false), Some(record(&i.to_be_bytes(), i as i64 + 1, 100).into()));
        }
        b.commit(&changes, &BTreeMap::new(), &Meta { consistent_index: 9, term: 1, current_rev: 1000, compacted_rev: 0 }).unwrap();
        drop_index(&b);
        let _ = b.build_index_in(100, &mut Collected::default(), |n| {
            if n == 2 {
                std::process::abort();
            }
        });
    }

    #[test]
    fn a_crash_while_the_index_is_built_leaves_it_to_be_built_again() {
        let d = tempfile::tempdir().unwrap();
        let path = crashed_in(d.path(), "backend::tests::index_build_crash_child", false);
        let b = Backend::open(&path).unwrap();
        let (how, rows) = read(&b);
        assert_eq!(how, IndexSource::Built, "the unfinished index is not used");
        assert_eq!(rows.len(), 1000);
        assert!(rows.iter().enumerate().all(|(i, (k, r))| k[..] == (i as u32).to_be_bytes() && r.rev.main == i as i64 + 1));
        assert_eq!(read(&b), (IndexSource::Persisted, rows));
    }
}

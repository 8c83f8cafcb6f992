//! The key index as layers over a base read on demand: the shape of an index whose committed
//! histories stay in the backend (a table keyed by user key) instead of memory, so that what it
//! holds in memory is bounded by the write batches rather than by the number of keys.
//!
//! Pure data structure: the base is anything that answers [`Base`] (the backend's table, or a
//! map in tests); calls only the index's history type and the backend's error type. Owns the
//! two layers above it, each a key → history map in which `None` marks a key gone (compacted
//! away):
//! - `pending`: the histories changed since the last batch was taken;
//! - `committing`: those of the batch being written to the base (taken by
//!   [`Layers::take_batch`], dropped by [`Layers::finish_batch`] once the base holds it, or put
//!   back under `pending` by [`Layers::abort_batch`]).
//!
//! A lookup reads `pending`, then `committing`, then the base; a range merges the three in key
//! order, the upper layer winning. Every change writes the key's whole history into `pending`
//! (read from below first), so a layer never needs the ones under it to be read. The live and
//! total key counts are kept here (the base does not count).
//!
//! Answers as [`crate::index::Index`] does for the same changes (property test below).

use crate::error::BackendError;
use crate::index::{bounds, count_live, empty_range, Change, KeyHistory, KeyMeta, Visible};
use crate::revision::Revision;
use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::Arc;

/// Histories changed above the base: `None` for a key gone.
pub type Layer = BTreeMap<Box<[u8]>, Option<KeyHistory>>;

/// One key's history as a range yields it.
pub type Entry = (Vec<u8>, KeyHistory);

/// A key a read at some revision sees: its visible revision and what
/// [`KeyHistory::shown_at`] knows of it.
pub type Shown = (Vec<u8>, Revision, Option<KeyMeta>);

/// A range of the base, in key order.
pub type BaseRange<'a> = Box<dyn Iterator<Item = Result<Entry, BackendError>> + 'a>;

/// The committed histories under the layers.
pub trait Base {
    /// The history of `key`, if the base holds one.
    fn get(&self, key: &[u8]) -> Result<Option<KeyHistory>, BackendError>;
    /// The histories of the keys within the bounds, in key order.
    fn range<'a>(&'a self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Result<BaseRange<'a>, BackendError>;
}

/// A key's slot in `pending` before a change, and the counts then (see [`Layers::undo`]).
#[derive(Debug, Clone)]
pub struct Before {
    slot: Option<Option<KeyHistory>>,
    live: usize,
    total: usize,
}

/// One part of a merge of a frozen layer into the backend's table of histories: the layer's
/// keys in `[from, to)` (None: unbounded). The last part carries `upto`, the revision up to which
/// the layer holds every change: once it is written the table holds them all, and the index's
/// log rows up to it are dropped.
#[derive(Debug, Clone)]
pub struct MergePart {
    layer: Arc<Layer>,
    from: Option<Box<[u8]>>,
    to: Option<Box<[u8]>>,
    upto: Option<i64>,
}

impl MergePart {
    /// The part of `layer` from `from` on, of at most `keys` keys; the last one (nothing after it)
    /// carries `upto`.
    pub fn of(layer: Arc<Layer>, from: Option<Box<[u8]>>, keys: usize, upto: i64) -> MergePart {
        let lo = from.as_deref().map_or(Bound::Unbounded, Bound::Included);
        let to = layer.range::<[u8], _>((lo, Bound::Unbounded)).nth(keys.max(1)).map(|(k, _)| k.clone());
        let upto = to.is_none().then_some(upto);
        MergePart { layer, from, to, upto }
    }

    /// The histories the part writes (`None`: the key is gone), in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &Option<KeyHistory>)> {
        let lo = self.from.as_deref().map_or(Bound::Unbounded, Bound::Included);
        let hi = self.to.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.layer.range::<[u8], _>((lo, hi)).map(|(k, h)| (&**k, h))
    }

    /// Where the next part begins; None after the last.
    pub fn next(&self) -> Option<&[u8]> {
        self.to.as_deref()
    }

    /// Set on the last part: the revision the table holds every change up to once it is written.
    pub fn upto(&self) -> Option<i64> {
        self.upto
    }
}

/// What a backend batch writes for an index kept in the backend, besides the records' log rows.
#[derive(Debug, Clone, Default)]
pub struct IndexLog {
    /// Keep the log rows of deleted records (the index is replayed from the log since its last
    /// merge: a compacted-away tombstone's row is what says the key is gone).
    pub keep_rows: bool,
    /// Parts of merges to write, oldest first.
    pub parts: Vec<MergePart>,
    /// Records whose log rows are written without them (a compaction dropped them before any
    /// batch wrote them: the log must still say what they did).
    pub rows: BTreeMap<Vec<u8>, Option<Arc<[u8]>>>,
}

/// The layers above a base; see the module's documentation.
#[derive(Debug, Default)]
pub struct Layers {
    pending: Layer,
    /// Bytes `pending` holds, as [`entry_bytes`] counts them.
    pending_bytes: usize,
    committing: Option<Arc<Layer>>,
    /// Keys whose newest change is not a tombstone.
    live: usize,
    /// Keys with a history.
    total: usize,
}

impl Layers {
    /// Layers over a base holding `total` keys, `live` of them live.
    pub fn new(live: usize, total: usize) -> Layers {
        Layers { live, total, ..Layers::default() }
    }

    /// The history of `key`, from the uppermost layer that has it.
    pub fn get(&self, base: &dyn Base, key: &[u8]) -> Result<Option<KeyHistory>, BackendError> {
        if let Some(h) = self.pending.get(key) {
            return Ok(h.clone());
        }
        if let Some(h) = self.committing.as_ref().and_then(|c| c.get(key)) {
            return Ok(h.clone());
        }
        base.get(key)
    }

    /// Records a put at `rev`.
    pub fn put(&mut self, base: &dyn Base, key: &[u8], rev: Revision, lease: i64, size: u32) -> Result<(), BackendError> {
        let old = self.get(base, key)?;
        if old.is_none() {
            self.total += 1;
        }
        let mut h = old.unwrap_or_default();
        if h.put(rev, lease, size) {
            self.live += 1;
        }
        self.set_pending(key, Some(h));
        Ok(())
    }

    /// Records a tombstone at `rev`. The key must be live.
    pub fn tombstone(&mut self, base: &dyn Base, key: &[u8], rev: Revision, size: u32) -> Result<(), BackendError> {
        if let Some(mut h) = self.get(base, key)? {
            h.tombstone(rev, size);
            self.live -= 1;
            self.set_pending(key, Some(h));
        }
        Ok(())
    }

    /// What [`Layers::undo`] needs to take back a change of `key` about to be made.
    pub fn before(&self, key: &[u8]) -> Before {
        Before { slot: self.pending.get(key).cloned(), live: self.live, total: self.total }
    }

    /// Takes back the change of `key` made after `before` was taken (a rolled-back write
    /// transaction undoes its changes newest first, with no batch taken meanwhile).
    pub fn undo(&mut self, key: &[u8], before: Before) {
        match before.slot {
            Some(slot) => self.set_pending(key, slot),
            None => self.remove_pending(key),
        }
        (self.live, self.total) = (before.live, before.total);
    }

    /// Moves the pending histories into the batch being committed, and gives them for the base
    /// to write. The previous batch must be finished or aborted.
    pub fn take_batch(&mut self) -> Arc<Layer> {
        debug_assert!(self.committing.is_none(), "a batch is already being committed");
        let batch = Arc::new(std::mem::take(&mut self.pending));
        self.pending_bytes = 0;
        self.committing = Some(batch.clone());
        batch
    }

    /// The base now holds the batch taken last: lookups go to it.
    pub fn finish_batch(&mut self) {
        self.committing = None;
    }

    /// The batch taken last was not written: its histories go back under the pending ones
    /// (which are newer).
    pub fn abort_batch(&mut self) {
        if let Some(batch) = self.committing.take() {
            let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
            for (k, h) in batch {
                if !self.pending.contains_key(&k) {
                    self.set_pending(&k, h);
                }
            }
        }
    }

    /// Sets `key`'s slot in `pending`, keeping its byte count.
    fn set_pending(&mut self, key: &[u8], h: Option<KeyHistory>) {
        self.pending_bytes += entry_bytes(key, &h);
        if let Some(old) = self.pending.insert(key.into(), h) {
            self.pending_bytes -= entry_bytes(key, &old);
        }
    }

    /// Takes `key`'s slot out of `pending`, keeping its byte count.
    fn remove_pending(&mut self, key: &[u8]) {
        if let Some(old) = self.pending.remove(key) {
            self.pending_bytes -= entry_bytes(key, &old);
        }
    }

    /// Keys changed since the last batch was taken.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of memory the changes since the last batch was taken hold (an estimate: keys,
    /// histories and the map's entries; what a flag bounds).
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Replays one row of the index's log (a change read back at a start, in revision order)
    /// over what the layers and the base hold, as [`crate::index::Index::restore`] takes it. A
    /// change the key's history already holds (its revision not above the newest) is skipped:
    /// a row written both into the base and into the log counts once. True when applied.
    #[allow(clippy::too_many_arguments)]
    pub fn replay(
        &mut self,
        base: &dyn Base,
        key: &[u8],
        rev: Revision,
        tombstone: bool,
        created: i64,
        version: i64,
        lease: i64,
        size: u32,
    ) -> Result<bool, BackendError> {
        let old = self.get(base, key)?;
        if old.as_ref().and_then(|h| h.changes.last()).is_some_and(|c| c.rev() >= rev) {
            return Ok(false);
        }
        if old.is_none() {
            self.total += 1;
        }
        let mut h = old.unwrap_or_default();
        let (was, now) = h.restore(rev, tombstone, created, version, lease, size);
        count_live(&mut self.live, was, now);
        self.set_pending(key, Some(h));
        Ok(true)
    }

    /// Every key in `[key, end)` with its history, in key order (see
    /// [`crate::index::bounds`] for `end`).
    pub fn range_all<'a>(&'a self, base: &'a dyn Base, key: &'a [u8], end: &'a [u8]) -> Result<Merged<'a>, BackendError> {
        if empty_range(key, end) {
            return Ok(Merged::empty());
        }
        self.range_bounds(base, bounds(key, end))
    }

    fn range_bounds<'a>(&'a self, base: &'a dyn Base, (lo, hi): (Bound<&'a [u8]>, Bound<&'a [u8]>)) -> Result<Merged<'a>, BackendError> {
        Ok(Merged {
            pending: Some(self.pending.range::<[u8], _>((lo, hi)).peekable()),
            committing: self.committing.as_ref().map(|c| c.range::<[u8], _>((lo, hi)).peekable()),
            base: Some(base.range(lo, hi)?.peekable()),
        })
    }

    /// Keys in `[key, end)` that exist at `at`, with their visible revision and what
    /// [`KeyHistory::shown_at`] knows of them.
    pub fn range_at_meta<'a>(
        &'a self,
        base: &'a dyn Base,
        key: &'a [u8],
        end: &'a [u8],
        at: i64,
    ) -> Result<impl Iterator<Item = Result<Shown, BackendError>> + 'a, BackendError> {
        Ok(self.range_all(base, key, end)?.filter_map(move |e| match e {
            Ok((k, h)) => h.shown_at(at).map(|(rev, meta)| Ok((k, rev, meta))),
            Err(e) => Some(Err(e)),
        }))
    }

    /// What every key shows at revision `at` (see [`Visible`]), keeping revisions up to `upto`.
    pub fn visible_revisions(&self, base: &dyn Base, at: i64, upto: i64) -> Result<Visible, BackendError> {
        let mut v = Visible::new(upto);
        for e in self.range_bounds(base, (Bound::Unbounded, Bound::Unbounded))? {
            let (_, h) = e?;
            v.see(&h, at);
        }
        Ok(v)
    }

    /// Compacts the histories of at most `limit` keys from `from` on (in key order) up to `at`,
    /// as [`crate::index::Index::compact_batch`] does: each history it changes goes into
    /// `pending`. Returns the key to go on from, None when every key after `from` is done.
    pub fn compact_batch(
        &mut self,
        base: &dyn Base,
        at: i64,
        from: &[u8],
        limit: usize,
        dropped: &mut Vec<Change>,
        mut visible: Option<&mut Visible>,
    ) -> Result<Option<Vec<u8>>, BackendError> {
        let mut changed: Vec<(Vec<u8>, Option<KeyHistory>)> = Vec::new();
        let mut next = None;
        for (n, e) in self.range_bounds(base, (Bound::Included(from), Bound::Unbounded))?.enumerate() {
            let (k, mut h) = e?;
            if n == limit {
                next = Some(k);
                break;
            }
            let held = h.changes.len();
            if h.compact(at, dropped, visible.as_deref_mut()) {
                changed.push((k, None));
            } else if h.changes.len() != held {
                changed.push((k, Some(h)));
            }
        }
        for (k, h) in changed {
            if h.is_none() {
                self.total -= 1;
            }
            self.set_pending(&k, h);
        }
        Ok(next)
    }

    /// Number of live keys.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// Number of keys with a history (live or ended by a tombstone not compacted yet).
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Memory an entry of a layer holds: its key, the history with its changes beyond the one kept
/// inline, and the map's share of a node (about a third of each entry again).
fn entry_bytes(key: &[u8], h: &Option<KeyHistory>) -> usize {
    let spilled = h.as_ref().map_or(0, |h| if h.changes.spilled() { h.changes.capacity() * std::mem::size_of::<Change>() } else { 0 });
    let entry = key.len() + std::mem::size_of::<Option<KeyHistory>>() + spilled + 2 * std::mem::size_of::<usize>();
    entry + entry / 3
}

type LayerRange<'a> = Peekable<std::collections::btree_map::Range<'a, Box<[u8]>, Option<KeyHistory>>>;

/// A range over the layers and the base, merged in key order (the upper layer's history wins;
/// keys gone are skipped).
pub struct Merged<'a> {
    pending: Option<LayerRange<'a>>,
    committing: Option<LayerRange<'a>>,
    base: Option<Peekable<BaseRange<'a>>>,
}

impl Merged<'_> {
    fn empty() -> Self {
        Merged { pending: None, committing: None, base: None }
    }
}

/// The key at the head of a layer's range.
fn head<'b>(r: &'b mut Option<LayerRange<'_>>) -> Option<&'b [u8]> {
    r.as_mut().and_then(|r| r.peek()).map(|e| &e.0[..])
}

impl Iterator for Merged<'_> {
    type Item = Result<Entry, BackendError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(Some(Err(_))) = self.base.as_mut().map(|b| b.peek()) {
                return self.base.as_mut().and_then(|b| b.next());
            }
            let p = head(&mut self.pending).map(<[u8]>::to_vec);
            let c = head(&mut self.committing).map(<[u8]>::to_vec);
            let b = match self.base.as_mut().and_then(|b| b.peek()) {
                Some(Ok((k, _))) => Some(k.clone()),
                _ => None,
            };
            let min = [&p, &c, &b].into_iter().flatten().min()?.clone();
            // The base's and the lower layer's entries for the key are passed over when an
            // upper layer has it.
            let from_base = if b.as_ref() == Some(&min) { self.base.as_mut().and_then(|it| it.next()) } else { None };
            let from_committing = if c.as_ref() == Some(&min) { self.committing.as_mut().and_then(|it| it.next()) } else { None };
            let from_pending = if p.as_ref() == Some(&min) { self.pending.as_mut().and_then(|it| it.next()) } else { None };
            let shown = match (from_pending, from_committing, from_base) {
                (Some((_, h)), _, _) | (None, Some((_, h)), _) => h.clone(),
                (None, None, Some(Ok((_, h)))) => Some(h),
                (None, None, Some(Err(e))) => return Some(Err(e)),
                (None, None, None) => None,
            };
            if let Some(h) = shown {
                return Some(Ok((min, h)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;

    /// A base in memory: what the backend's table holds after each finished batch.
    #[derive(Default)]
    struct MemBase(BTreeMap<Vec<u8>, KeyHistory>);

    impl Base for MemBase {
        fn get(&self, key: &[u8]) -> Result<Option<KeyHistory>, BackendError> {
            Ok(self.0.get(key).cloned())
        }

        fn range<'a>(&'a self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Result<BaseRange<'a>, BackendError> {
            let owned = |b: Bound<&[u8]>| match b {
                Bound::Included(k) => Bound::Included(k.to_vec()),
                Bound::Excluded(k) => Bound::Excluded(k.to_vec()),
                Bound::Unbounded => Bound::Unbounded,
            };
            Ok(Box::new(self.0.range((owned(lo), owned(hi))).map(|(k, h)| Ok((k.clone(), h.clone())))))
        }
    }

    /// A base the test writes finished batches into.
    trait TestBase: Base {
        fn write(&mut self, batch: &Layer);
    }

    impl TestBase for MemBase {
        fn write(&mut self, batch: &Layer) {
            for (k, h) in batch {
                match h {
                    Some(h) => self.0.insert(k.to_vec(), h.clone()),
                    None => self.0.remove(&k[..]),
                };
            }
        }
    }

    /// The backend's table `key_by_key`, read through a view taken after each batch.
    struct RedbBase {
        backend: crate::backend::Backend,
        view: crate::backend::Histories,
        _dir: tempfile::TempDir,
    }

    impl RedbBase {
        fn new() -> RedbBase {
            let dir = tempfile::tempdir().unwrap();
            let backend = crate::backend::Backend::open(&dir.path().join("db")).unwrap();
            let view = backend.histories().unwrap();
            RedbBase { backend, view, _dir: dir }
        }
    }

    impl Base for RedbBase {
        fn get(&self, key: &[u8]) -> Result<Option<KeyHistory>, BackendError> {
            self.view.get(key)
        }

        fn range<'a>(&'a self, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Result<BaseRange<'a>, BackendError> {
            self.view.range(lo, hi)
        }
    }

    impl TestBase for RedbBase {
        fn write(&mut self, batch: &Layer) {
            let meta = self.backend.merge_histories(batch.iter().map(|(k, h)| (&k[..], h)), None).unwrap();
            self.view = self.backend.histories().unwrap();
            // The table's counts follow its rows.
            let rows: Vec<KeyHistory> = self.view.range(Bound::Unbounded, Bound::Unbounded).unwrap().map(|e| e.unwrap().1).collect();
            assert_eq!(meta.total, rows.len() as u64);
            assert_eq!(meta.live, rows.iter().filter(|h| h.is_live()).count() as u64);
            assert_eq!(meta.bytes, rows.iter().map(KeyHistory::record_bytes).sum::<u64>());
            self.view = self.backend.histories().unwrap();
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A transaction of puts (true) and deletes (false) of keys; rolled back when the bool
        /// says so.
        Txn(Vec<(u8, bool)>, bool),
        Take,
        Finish,
        Abort,
        /// A compaction at the current revision minus the number given, in batches of 2 keys.
        Compact(i64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (proptest::collection::vec((0u8..8, any::<bool>()), 1..4), proptest::bool::weighted(0.2)).prop_map(|(w, r)| Op::Txn(w, r)),
            1 => Just(Op::Take),
            1 => Just(Op::Finish),
            1 => Just(Op::Abort),
            1 => (0i64..4).prop_map(Op::Compact),
        ]
    }

    type Seen = (Vec<(Vec<u8>, Vec<Change>, i64, i64, i64)>, usize, usize);

    fn seen_index(ix: &Index) -> Seen {
        let keys = ix.range_all(b"", &[0]).map(|(k, h)| (k.to_vec(), h.changes.to_vec(), h.created, h.version, h.lease)).collect();
        (keys, ix.live_count(), ix.len())
    }

    fn seen_layers(l: &Layers, base: &dyn Base) -> Seen {
        let keys = l
            .range_all(base, b"", &[0])
            .unwrap()
            .map(|e| {
                let (k, h) = e.unwrap();
                (k, h.changes.to_vec(), h.created, h.version, h.lease)
            })
            .collect();
        (keys, l.live_count(), l.len())
    }

    proptest::proptest! {
        /// Layers over a base answer what the in-memory index answers after the same changes,
        /// whatever the batches taken, finished or aborted between them.
        #[test]
        fn layers_answer_as_the_index_does(ops in proptest::collection::vec(op(), 1..60)) {
            answers_as_the_index(&mut MemBase::default(), ops)?;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// The same over the backend's table, each finished batch committed to it.
        #[test]
        fn layers_over_the_backend_answer_as_the_index_does(ops in proptest::collection::vec(op(), 1..40)) {
            answers_as_the_index(&mut RedbBase::new(), ops)?;
        }
    }

    /// Rows of a key index's log, as a start reads them: (key, revision, tombstone, created,
    /// version, lease, size), in revision order.
    type Row = ([u8; 2], Revision, bool, i64, i64, i64, u32);

    fn rows(ops: Vec<(u8, bool, i64)>) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut state = std::collections::HashMap::<u8, (i64, i64)>::new();
        for (main, (k, delete, lease)) in (2i64..).zip(ops) {
            let now = state.get(&k).copied();
            if delete && now.is_none() {
                continue;
            }
            let (created, version) = if delete {
                state.remove(&k);
                (0, 0)
            } else {
                let cv = now.map(|(c, v)| (c, v + 1)).unwrap_or((main, 1));
                state.insert(k, cv);
                cv
            };
            rows.push(([b'k', k], Revision::new(main, 0), delete, created, version, lease, main as u32));
        }
        rows
    }

    proptest::proptest! {
        /// Replaying a log over a base that already holds part of it (a merge a crash cut short:
        /// some keys' histories written, the log not yet trimmed) gives the index that restoring
        /// the whole log gives: what the base holds is not applied twice.
        #[test]
        fn a_replayed_log_counts_each_change_once(
            ops in proptest::collection::vec((0u8..6, proptest::bool::ANY, 0i64..3), 0..80),
            merged in proptest::collection::vec(proptest::bool::ANY, 6),
        ) {
            let rows = rows(ops);
            let mut ix = Index::default();
            let mut first = Layers::default();
            let empty = MemBase::default();
            for &(k, rev, tomb, c, v, l, size) in &rows {
                ix.restore(&k, rev, tomb, c, v, l, size);
                proptest::prop_assert!(first.replay(&empty, &k, rev, tomb, c, v, l, size).unwrap());
            }
            // A merge of the replayed layer that wrote only some keys' histories.
            let mut base = MemBase::default();
            let batch = first.take_batch();
            for (k, h) in batch.iter() {
                if merged[(k[1] % 6) as usize] {
                    base.write(&[(k.clone(), h.clone())].into_iter().collect());
                }
            }
            // The counts of what the base holds (a merge keeps them with each part it writes).
            let live = base.0.values().filter(|h| h.is_live()).count();
            let mut again = Layers::new(live, base.0.len());
            for &(k, rev, tomb, c, v, l, size) in &rows {
                again.replay(&base, &k, rev, tomb, c, v, l, size).unwrap();
            }
            proptest::prop_assert_eq!(seen_layers(&again, &base), seen_index(&ix));
        }
    }

    fn answers_as_the_index<B: TestBase>(base: &mut B, ops: Vec<Op>) -> Result<(), proptest::test_runner::TestCaseError> {
        {
            let mut ix = Index::default();
            let mut layers = Layers::default();
            let mut taken: Option<Arc<Layer>> = None;
            let mut main = 1i64;
            for op in ops {
                match op {
                    Op::Txn(writes, rollback) => {
                        main += 1;
                        let mut undo_ix = Vec::new();
                        let mut undo_l = Vec::new();
                        for (sub, (k, put)) in writes.into_iter().enumerate() {
                            let key = [b'k', k];
                            let rev = Revision::new(main, sub as i64);
                            let live = ix.get(&key).is_some_and(|h| h.is_live());
                            if !put && !live {
                                continue;
                            }
                            undo_ix.push((key, rev, ix.before(&key)));
                            undo_l.push((key, layers.before(&key)));
                            if put {
                                ix.put(&key, rev, k as i64 % 3, 10 + sub as u32);
                                layers.put(&*base, &key, rev, k as i64 % 3, 10 + sub as u32).unwrap();
                            } else {
                                ix.tombstone(&key, rev, 5);
                                layers.tombstone(&*base, &key, rev, 5).unwrap();
                            }
                        }
                        if rollback {
                            for (key, rev, b) in undo_ix.into_iter().rev() {
                                ix.undo(&key, rev, b);
                            }
                            for (key, b) in undo_l.into_iter().rev() {
                                layers.undo(&key, b);
                            }
                            main -= 1;
                        }
                    }
                    Op::Take => {
                        if taken.is_none() {
                            taken = Some(layers.take_batch());
                        }
                    }
                    Op::Finish => {
                        if let Some(batch) = taken.take() {
                            base.write(&batch);
                            layers.finish_batch();
                        }
                    }
                    Op::Abort => {
                        if taken.take().is_some() {
                            layers.abort_batch();
                        }
                    }
                    Op::Compact(back) => {
                        let at = (main - back).max(1);
                        let mut want = Vec::new();
                        let mut v_ix = Visible::new(at);
                        let mut from = Some(Vec::new());
                        while let Some(f) = from {
                            from = ix.compact_batch(at, &f, 2, &mut want, Some(&mut v_ix));
                        }
                        let mut got = Vec::new();
                        let mut v_l = Visible::new(at);
                        let mut from = Some(Vec::new());
                        while let Some(f) = from {
                            from = layers.compact_batch(&*base, at, &f, 2, &mut got, Some(&mut v_l)).unwrap();
                        }
                        proptest::prop_assert_eq!(&got, &want);
                        proptest::prop_assert_eq!(v_l.any(), v_ix.any());
                        proptest::prop_assert_eq!(v_l.into_revs(), v_ix.into_revs());
                    }
                }
                proptest::prop_assert_eq!(seen_layers(&layers, &*base), seen_index(&ix));
                let counted: usize = layers.pending.iter().map(|(k, h)| entry_bytes(k, h)).sum();
                proptest::prop_assert_eq!(layers.pending_bytes(), counted);
                for at in [main - 2, main - 1, main] {
                    let a: Vec<_> = ix.range_at_meta(b"", &[0], at).map(|(k, r, m)| (k.to_vec(), r, m)).collect();
                    let b: Vec<_> = layers.range_at_meta(&*base, b"", &[0], at).unwrap().map(|e| e.unwrap()).collect();
                    proptest::prop_assert_eq!(a, b);
                }
                for k in 0u8..8 {
                    let key = [b'k', k];
                    let a = ix.get(&key).map(|h| h.changes.to_vec());
                    let b = layers.get(&*base, &key).unwrap().map(|h| h.changes.to_vec());
                    proptest::prop_assert_eq!(a, b);
                }
            }
        }
        Ok(())
    }
}

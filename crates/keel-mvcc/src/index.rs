//! The in-memory ordered index: for each key, the revisions of its changes still held.
//!
//! Pure data structure; knows nothing of the backend. Invariants (checked in debug builds):
//! a key's revisions strictly increase; `created`/`version` describe its live generation and are
//! zero when the newest change is a tombstone.

use crate::revision::Revision;
use std::collections::BTreeMap;
use std::ops::Bound;

/// One change of a key, in 16 bytes (the index holds one per key and revision kept: at 5 GB of
/// 1 KiB values, 24 bytes made 5% of a member's memory). `sub` counts the changes of one write
/// transaction (bounded by `--max-txn-ops` and the request size, far below 2^32); the record's
/// size shares a word with the tombstone mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    main: i64,
    sub: u32,
    /// Bit 31: a tombstone; bits 0-30: bytes of the change's backend record (key and value),
    /// for the store's size accounting (saturated at 2^31 - 1).
    size_tomb: u32,
}

const TOMBSTONE_BIT: u32 = 1 << 31;

impl Change {
    pub fn new(rev: Revision, tombstone: bool, size: u32) -> Change {
        debug_assert!((0..=u32::MAX as i64).contains(&rev.sub), "sub revision {} out of range", rev.sub);
        let sub = u32::try_from(rev.sub).unwrap_or(u32::MAX);
        let size = size.min(TOMBSTONE_BIT - 1);
        Change { main: rev.main, sub, size_tomb: if tombstone { size | TOMBSTONE_BIT } else { size } }
    }

    pub fn rev(&self) -> Revision {
        Revision { main: self.main, sub: self.sub as i64 }
    }

    /// The change's main revision (`rev().main`).
    pub fn main(&self) -> i64 {
        self.main
    }

    pub fn tombstone(&self) -> bool {
        self.size_tomb & TOMBSTONE_BIT != 0
    }

    /// Bytes of the change's backend record.
    pub fn size(&self) -> u32 {
        self.size_tomb & !TOMBSTONE_BIT
    }
}

/// A key's changes: most keys hold one between compactions, kept inline (no allocation).
pub type Changes = smallvec::SmallVec<[Change; 1]>;

/// A key's history.
#[derive(Debug, Clone, Default)]
pub struct KeyHistory {
    pub changes: Changes,
    /// create_revision of the live generation, 0 when the key does not exist now.
    pub created: i64,
    /// version of the live generation, 0 when the key does not exist now.
    pub version: i64,
    /// lease of the live value.
    pub lease: i64,
}

impl KeyHistory {
    /// The newest change with main <= at, tombstone or not.
    fn newest_at(&self, at: i64) -> Option<Change> {
        let pos = self.changes.partition_point(|c| c.main() <= at);
        pos.checked_sub(1).map(|i| self.changes[i])
    }

    /// The change visible at revision `at`: the newest with main <= at, if it is not a tombstone.
    pub fn visible_at(&self, at: i64) -> Option<Revision> {
        self.newest_at(at).filter(|c| !c.tombstone()).map(|c| c.rev())
    }

    /// Bytes of the backend records the history's changes stand for.
    pub fn record_bytes(&self) -> u64 {
        self.changes.iter().map(|c| c.size() as u64).sum()
    }

    pub fn is_live(&self) -> bool {
        self.changes.last().map(|c| !c.tombstone()).unwrap_or(false)
    }

    /// Encoded length of the fixed fields: created, version, lease (8 bytes each, big-endian).
    const FIXED: usize = 24;
    /// Encoded length of one change: main (8), sub (4), size and tombstone mark (4).
    const CHANGE: usize = 16;

    /// The history's stored form (a row of a table keyed by user key): the fixed fields, then
    /// each change in revision order.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::FIXED + Self::CHANGE * self.changes.len());
        for f in [self.created, self.version, self.lease] {
            b.extend_from_slice(&f.to_be_bytes());
        }
        for c in &self.changes {
            b.extend_from_slice(&c.main.to_be_bytes());
            b.extend_from_slice(&c.sub.to_be_bytes());
            b.extend_from_slice(&c.size_tomb.to_be_bytes());
        }
        b
    }

    /// The history encoded in `b` by [`KeyHistory::encode`]; None when `b` is not one (a
    /// length that does not fit, revisions that do not increase, no change at all).
    pub fn decode(b: &[u8]) -> Option<KeyHistory> {
        if b.len() < Self::FIXED + Self::CHANGE || !(b.len() - Self::FIXED).is_multiple_of(Self::CHANGE) {
            return None;
        }
        let i64_at = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(i64::from_be_bytes);
        let u32_at = |i: usize| b.get(i..i + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes);
        let mut h = KeyHistory { changes: Changes::new(), created: i64_at(0)?, version: i64_at(8)?, lease: i64_at(16)? };
        for at in (Self::FIXED..b.len()).step_by(Self::CHANGE) {
            let c = Change { main: i64_at(at)?, sub: u32_at(at + 8)?, size_tomb: u32_at(at + 12)? };
            if h.changes.last().is_some_and(|last| last.rev() >= c.rev()) {
                return None;
            }
            h.changes.push(c);
        }
        Some(h)
    }

    /// Appends a change read back from the backend (a record's index row), with the key's
    /// generation as the row gives it: a tombstone ends it.
    /// Returns whether the key was live before and is after.
    pub fn restore(&mut self, rev: Revision, tombstone: bool, created: i64, version: i64, lease: i64, size: u32) -> (bool, bool) {
        let was_live = self.is_live();
        self.changes.push(Change::new(rev, tombstone, size));
        (self.created, self.version, self.lease) = if tombstone { (0, 0, 0) } else { (created, version, lease) };
        (was_live, self.is_live())
    }

    /// Records a put at `rev`; true when it starts a new generation (the key was not live).
    pub fn put(&mut self, rev: Revision, lease: i64, size: u32) -> bool {
        debug_assert!(self.changes.last().map(|c| c.rev() < rev).unwrap_or(true), "revisions must increase");
        let new_generation = !self.is_live();
        if new_generation {
            self.created = rev.main;
            self.version = 0;
        }
        self.version += 1;
        self.lease = lease;
        self.changes.push(Change::new(rev, false, size));
        new_generation
    }

    /// Records a tombstone at `rev`, ending the live generation.
    pub fn tombstone(&mut self, rev: Revision, size: u32) {
        debug_assert!(self.is_live(), "tombstone on a deleted key");
        self.changes.push(Change::new(rev, true, size));
        self.created = 0;
        self.version = 0;
        self.lease = 0;
    }

    /// What a read at revision `at` shows of the key: the revision of its visible change, and
    /// its create revision and version at `at` when the history knows them (the visible change
    /// belongs to the live generation, whose create revision and version are kept; None when
    /// that generation has ended: its start may be compacted away). None when nothing is
    /// visible at `at`.
    pub fn shown_at(&self, at: i64) -> Option<(Revision, Option<KeyMeta>)> {
        let pos = self.changes.partition_point(|c| c.main() <= at);
        let c = self.changes.get(pos.checked_sub(1)?)?;
        if c.tombstone() {
            return None;
        }
        let later = &self.changes[pos..];
        let meta = (self.created != 0 && !later.iter().any(|c| c.tombstone())).then(|| {
            let version = self.version - later.len() as i64;
            debug_assert!(version >= 1 && self.created <= c.main(), "index: live generation inconsistent at {at}");
            KeyMeta { create_revision: self.created, version }
        });
        Some((c.rev(), meta))
    }

    /// Drops the changes a compaction at `at` supersedes (see [`Index::compact`]) into
    /// `dropped`, telling `visible` what the key shows at `at`. True when nothing is left (the
    /// key leaves the index).
    pub fn compact(&mut self, at: i64, dropped: &mut Vec<Change>, visible: Option<&mut Visible>) -> bool {
        let pos = self.changes.partition_point(|c| c.main() <= at);
        if pos == 0 {
            return false;
        }
        let newest = self.changes[pos - 1];
        if let Some(v) = visible {
            v.saw(&newest);
        }
        let cut = if newest.tombstone() && newest.main() != at { pos } else { pos - 1 };
        dropped.extend(self.changes.drain(..cut));
        self.changes.is_empty()
    }
}

/// The revisions a walk over the keys found visible at one revision (each key's newest change
/// up to it, when not a tombstone), kept only up to `upto`; and whether it found any at all.
/// What a hash of the key space at that revision needs of the index (etcd's `Keep`).
#[derive(Debug, Default)]
pub struct Visible {
    upto: i64,
    revs: Vec<Revision>,
    any: bool,
}

impl Visible {
    /// Nothing seen yet; revisions above `upto` are not kept.
    pub fn new(upto: i64) -> Visible {
        Visible { upto, revs: Vec::new(), any: false }
    }

    /// A key whose newest change up to the walk's revision is `c`.
    fn saw(&mut self, c: &Change) {
        if c.tombstone() {
            return;
        }
        self.any = true;
        if c.main() <= self.upto {
            self.revs.push(c.rev());
        }
    }

    /// A key with history `h`, at the walk's revision `at`.
    pub(crate) fn see(&mut self, h: &KeyHistory, at: i64) {
        if let Some(c) = h.newest_at(at) {
            self.saw(&c);
        }
    }

    /// True when some key was visible.
    pub fn any(&self) -> bool {
        self.any
    }

    /// The kept revisions, in the walk's (key) order.
    pub fn into_revs(self) -> Vec<Revision> {
        self.revs
    }
}

/// A key's create revision and version at some revision (see [`Index::range_at_meta`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMeta {
    pub create_revision: i64,
    pub version: i64,
}

impl KeyMeta {
    /// The key-value a keys-only read answers for `key` changed at `rev`: no value, no lease.
    pub fn key_value(&self, key: &[u8], rev: Revision) -> keel_proto::mvccpb::KeyValue {
        keel_proto::mvccpb::KeyValue {
            key: key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: rev.main,
            version: self.version,
            ..Default::default()
        }
    }
}

/// A key's state before a change (see [`Index::before`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    created: i64,
    version: i64,
    lease: i64,
    existed: bool,
}

/// The ordered key index.
#[derive(Debug, Default)]
pub struct Index {
    /// Keys as boxed slices: no spare capacity, one word less than a `Vec` per key.
    keys: BTreeMap<Box<[u8]>, KeyHistory>,
    /// Keys whose last change is not a tombstone.
    live: usize,
}

/// Builds an [`Index`] from a backend's records, read in revision order: one sort by key and a
/// bulk build, instead of one tree insertion per record (records come in revision order, which
/// is random key order, so each insertion walks the tree through cold memory).
///
/// Each record is kept as the one-change history it starts as, so that a key's records merge
/// in place and the tree is built from the same buffer: a start touches that buffer and the
/// tree's nodes, no third copy (fresh memory is what a start mostly waits for: the kernel
/// zeroing pages it faults in).
#[derive(Debug, Default)]
pub struct Builder {
    records: Vec<(Box<[u8]>, KeyHistory)>,
}

impl Builder {
    /// Makes room for `n` more records, so that the buffer is not grown (and copied) as they come.
    pub fn reserve(&mut self, n: usize) {
        self.records.reserve_exact(n);
    }

    /// Adds one record, as [`Index::restore`] would take it.
    #[allow(clippy::too_many_arguments)]
    pub fn push(&mut self, key: Vec<u8>, rev: Revision, tombstone: bool, created: i64, version: i64, lease: i64, size: u32) {
        // A tombstone ends the key's generation: as `Index::restore` takes it.
        let (created, version, lease) = if tombstone { (0, 0, 0) } else { (created, version, lease) };
        let mut changes = Changes::new();
        changes.push(Change::new(rev, tombstone, size));
        self.records.push((key.into_boxed_slice(), KeyHistory { changes, created, version, lease }));
    }

    /// The index holding every record pushed: as if each had been restored in revision order.
    pub fn finish(mut self) -> Index {
        // Each key's records end up together, in revision order (every history holds one change
        // until the merge below).
        self.records.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.changes[0].rev().cmp(&b.1.changes[0].rev())));
        // A key's later records merge into its first, in place; the later state wins.
        self.records.dedup_by(|later, first| {
            if later.0 != first.0 {
                return false;
            }
            let change = later.1.changes[0];
            debug_assert!(first.1.changes.last().is_some_and(|c| c.rev() < change.rev()), "revisions must increase");
            first.1.changes.push(change);
            (first.1.created, first.1.version, first.1.lease) = (later.1.created, later.1.version, later.1.lease);
            true
        });
        let live = self.records.iter().filter(|(_, h)| h.is_live()).count();
        // Sorted and without duplicates: BTreeMap builds it in one pass.
        Index { keys: self.records.into_iter().collect(), live }
    }
}

/// The range `[key, end)`; an empty `end` means the single key, `end == [0]` means every key >= key.
pub fn bounds<'a>(key: &'a [u8], end: &'a [u8]) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    if end.is_empty() {
        (Bound::Included(key), Bound::Included(key))
    } else if end == [0u8] {
        (Bound::Included(key), Bound::Unbounded)
    } else {
        (Bound::Included(key), Bound::Excluded(end))
    }
}

/// True when the range is empty by construction (end <= key, end not special).
pub(crate) fn empty_range(key: &[u8], end: &[u8]) -> bool {
    !end.is_empty() && end != [0u8] && end <= key
}

/// Keeps a count of live keys as one key goes from live (`was`) or not to live (`now`) or not.
pub(crate) fn count_live(live: &mut usize, was: bool, now: bool) {
    match (was, now) {
        (false, true) => *live += 1,
        (true, false) => *live -= 1,
        _ => {}
    }
}

/// The key's history, created empty if new (the key is copied only then).
fn history_mut<'a>(keys: &'a mut BTreeMap<Box<[u8]>, KeyHistory>, key: &[u8]) -> &'a mut KeyHistory {
    if !keys.contains_key(key) {
        keys.insert(key.into(), KeyHistory::default());
    }
    keys.get_mut(key).expect("just inserted")
}

impl Index {
    /// The index of these histories, given in key order.
    pub fn from_sorted(histories: Vec<(Vec<u8>, KeyHistory)>) -> Index {
        let live = histories.iter().filter(|(_, h)| h.is_live()).count();
        Index { keys: histories.into_iter().map(|(k, h)| (k.into_boxed_slice(), h)).collect(), live }
    }

    pub fn get(&self, key: &[u8]) -> Option<&KeyHistory> {
        self.keys.get(key)
    }

    /// Records a put at `rev`; returns the history's state before it.
    pub fn put(&mut self, key: &[u8], rev: Revision, lease: i64, size: u32) {
        if history_mut(&mut self.keys, key).put(rev, lease, size) {
            self.live += 1;
        }
    }

    /// Records a tombstone at `rev`. The key must be live.
    pub fn tombstone(&mut self, key: &[u8], rev: Revision, size: u32) {
        if let Some(h) = self.keys.get_mut(key) {
            h.tombstone(rev, size);
            self.live -= 1;
        }
    }

    /// A key's live-generation state before a change, for [`Index::undo`].
    pub fn before(&self, key: &[u8]) -> Before {
        match self.keys.get(key) {
            Some(h) => Before { created: h.created, version: h.version, lease: h.lease, existed: true },
            None => Before { created: 0, version: 0, lease: 0, existed: false },
        }
    }

    /// Takes back the newest change of `key`, made at `rev` by [`Index::put`] or
    /// [`Index::tombstone`] when the key's state was `before` (a rolled-back write transaction
    /// undoes its changes newest first).
    pub fn undo(&mut self, key: &[u8], rev: Revision, before: Before) {
        let Some(h) = self.keys.get_mut(key) else {
            debug_assert!(false, "undo of a key not in the index");
            return;
        };
        debug_assert_eq!(h.changes.last().map(|c| c.rev()), Some(rev), "undo must take the newest change");
        if h.changes.last().map(|c| c.rev()) != Some(rev) {
            return;
        }
        let was_live = h.is_live();
        h.changes.pop();
        count_live(&mut self.live, was_live, h.is_live());
        h.created = before.created;
        h.version = before.version;
        h.lease = before.lease;
        if !before.existed && h.changes.is_empty() {
            self.keys.remove(key);
        }
    }

    /// Restores one change read back from the backend, in revision order.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(&mut self, key: &[u8], rev: Revision, tombstone: bool, created: i64, version: i64, lease: i64, size: u32) {
        let (was, now) = history_mut(&mut self.keys, key).restore(rev, tombstone, created, version, lease, size);
        count_live(&mut self.live, was, now);
    }

    /// Like [`Index::range_at`], with what a keys-only answer needs of each key besides its
    /// revision (see [`KeyHistory::shown_at`]).
    pub fn range_at_meta<'a>(
        &'a self,
        key: &'a [u8],
        end: &'a [u8],
        at: i64,
    ) -> impl Iterator<Item = (&'a [u8], Revision, Option<KeyMeta>)> + 'a {
        let empty = empty_range(key, end);
        let it = if empty { None } else { Some(self.keys.range::<[u8], _>(bounds(key, end))) };
        it.into_iter().flatten().filter_map(move |(k, h)| h.shown_at(at).map(|(rev, meta)| (&**k, rev, meta)))
    }

    /// What every key shows at revision `at` (see [`Visible`]), keeping revisions up to `upto`.
    pub fn visible_revisions(&self, at: i64, upto: i64) -> Visible {
        let mut v = Visible::new(upto);
        for h in self.keys.values() {
            v.see(h, at);
        }
        v
    }

    /// Keys in `[key, end)` that exist at revision `at`, in key order, with the visible revision.
    pub fn range_at<'a>(&'a self, key: &'a [u8], end: &'a [u8], at: i64) -> impl Iterator<Item = (&'a [u8], Revision)> + 'a {
        let empty = empty_range(key, end);
        let it = if empty { None } else { Some(self.keys.range::<[u8], _>(bounds(key, end))) };
        it.into_iter().flatten().filter_map(move |(k, h)| h.visible_at(at).map(|r| (&**k, r)))
    }

    /// Every key in `[key, end)` with its history, live or not.
    pub fn range_all<'a>(&'a self, key: &'a [u8], end: &'a [u8]) -> impl Iterator<Item = (&'a [u8], &'a KeyHistory)> + 'a {
        let empty = empty_range(key, end);
        let it = if empty { None } else { Some(self.keys.range::<[u8], _>(bounds(key, end))) };
        it.into_iter().flatten().map(|(k, h)| (&**k, h))
    }

    /// Drops every change superseded at revision `at`: for each key, all changes older than the
    /// newest one with main <= at, and that one too if it is a tombstone older than `at`. A
    /// tombstone at `at` itself stays (as etcd 3.6 keeps it), so that a watch from the compaction
    /// revision still sees that delete. Returns the dropped changes so the backend can delete
    /// them.
    pub fn compact(&mut self, at: i64) -> Vec<Change> {
        let mut dropped = Vec::new();
        let mut from = Some(Vec::new());
        while let Some(f) = from {
            from = self.compact_batch(at, &f, usize::MAX, &mut dropped, None);
        }
        dropped
    }

    /// Compacts the histories of at most `limit` keys from `from` on (in key order) up to `at`,
    /// adding the changes it drops to `dropped`, and to `visible` what each key shows at `at`.
    /// Returns the key to go on from, None when every key after `from` is done. Keys not reached
    /// yet keep revisions older than `at`, which no read at or after `at` sees.
    pub fn compact_batch(
        &mut self,
        at: i64,
        from: &[u8],
        limit: usize,
        dropped: &mut Vec<Change>,
        mut visible: Option<&mut Visible>,
    ) -> Option<Vec<u8>> {
        let mut emptied = Vec::new();
        let mut next = None;
        for (n, (k, h)) in self.keys.range_mut::<[u8], _>((std::ops::Bound::Included(from), std::ops::Bound::Unbounded)).enumerate() {
            if n == limit {
                next = Some(k.to_vec());
                break;
            }
            if h.compact(at, dropped, visible.as_deref_mut()) {
                emptied.push(k.clone());
            }
        }
        for k in emptied {
            self.keys.remove(&k);
        }
        next
    }

    /// Number of live keys.
    pub fn live_count(&self) -> usize {
        self.live
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(m: i64) -> Revision {
        Revision::new(m, 0)
    }

    #[test]
    fn a_change_takes_16_bytes_and_keeps_what_it_was_given() {
        assert_eq!(std::mem::size_of::<Change>(), 16);
        assert_eq!(std::mem::size_of::<KeyHistory>(), 48, "one change inline, created, version, lease");
        for (rev, tomb, size) in
            [(Revision::new(7, 0), false, 0u32), (Revision::new(i64::MAX, 127), true, 1 << 20), (Revision::new(1, 3), false, (1 << 31) - 1)]
        {
            let c = Change::new(rev, tomb, size);
            assert_eq!((c.rev(), c.main(), c.tombstone(), c.size()), (rev, rev.main, tomb, size));
        }
        // A record size past 31 bits saturates (it only feeds the size accounting) and never
        // reads as a tombstone.
        let c = Change::new(Revision::new(2, 0), false, u32::MAX);
        assert_eq!((c.tombstone(), c.size()), (false, (1 << 31) - 1));
    }

    #[test]
    fn generations_and_visibility() {
        let mut ix = Index::default();
        ix.put(b"a", r(2), 0, 1);
        ix.put(b"a", r(3), 0, 1);
        ix.tombstone(b"a", r(4), 1);
        ix.put(b"a", r(5), 0, 1);
        let h = ix.get(b"a").unwrap();
        assert_eq!((h.created, h.version), (5, 1));
        assert_eq!(h.visible_at(1), None);
        assert_eq!(h.visible_at(3), Some(r(3)));
        assert_eq!(h.visible_at(4), None);
        assert_eq!(h.visible_at(9), Some(r(5)));
    }

    #[test]
    fn compaction_keeps_what_is_visible() {
        let mut ix = Index::default();
        ix.put(b"a", r(2), 0, 1);
        ix.put(b"a", r(3), 0, 1);
        ix.put(b"b", r(4), 0, 1);
        ix.tombstone(b"b", r(5), 1);
        ix.put(b"c", r(6), 0, 1);
        let dropped = ix.compact(5);
        let revs: Vec<i64> = dropped.iter().map(|c| c.main()).collect();
        assert_eq!(revs, vec![2, 4], "b's tombstone at the compaction revision stays (etcd 3.6)");
        assert_eq!(ix.get(b"b").unwrap().visible_at(5), None);
        assert_eq!(ix.get(b"a").unwrap().visible_at(5), Some(r(3)));
        assert_eq!(ix.get(b"c").unwrap().changes.len(), 1);
        // The next compaction past it drops the tombstone and the key.
        let dropped = ix.compact(6);
        assert_eq!(dropped.iter().map(|c| c.main()).collect::<Vec<_>>(), vec![5]);
        assert!(ix.get(b"b").is_none());
    }

    #[test]
    fn undo_restores_each_change_exactly() {
        let mut ix = Index::default();
        ix.put(b"a", r(2), 7, 1);
        ix.put(b"b", r(3), 0, 1);
        ix.tombstone(b"b", r(4), 1);
        let snapshot = |ix: &Index| {
            let keys: Vec<_> = ix.keys.iter().map(|(k, h)| (k.to_vec(), h.changes.to_vec(), h.created, h.version, h.lease)).collect();
            (keys, ix.live)
        };
        let start = snapshot(&ix);
        // A transaction: put a (live), put b (deleted: a new generation), tombstone a, put c (new).
        let mut undo = Vec::new();
        for (k, rev, put) in [
            (b"a", Revision::new(5, 0), true),
            (b"b", Revision::new(5, 1), true),
            (b"a", Revision::new(5, 2), false),
            (b"c", Revision::new(5, 3), true),
        ] {
            undo.push((k, rev, ix.before(k)));
            if put {
                ix.put(k, rev, 9, 1);
            } else {
                ix.tombstone(k, rev, 1);
            }
        }
        assert_ne!(snapshot(&ix), start);
        for (k, rev, before) in undo.into_iter().rev() {
            ix.undo(k, rev, before);
        }
        assert_eq!(snapshot(&ix), start);
        assert!(ix.get(b"c").is_none());
    }

    #[test]
    fn range_bounds() {
        let mut ix = Index::default();
        for (i, k) in [b"a".as_slice(), b"b", b"c"].iter().enumerate() {
            ix.put(k, r(i as i64 + 2), 0, 1);
        }
        let all: Vec<_> = ix.range_at(b"\0", b"\0", 10).map(|(k, _)| k.to_vec()).collect();
        assert_eq!(all.len(), 3);
        let ab: Vec<_> = ix.range_at(b"a", b"c", 10).map(|(k, _)| k.to_vec()).collect();
        assert_eq!(ab, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(ix.range_at(b"c", b"a", 10).count(), 0);
        assert_eq!(ix.range_at(b"b", b"", 10).count(), 1);
    }

    proptest::proptest! {
        /// A history's stored form decodes to the same history; a cut or lengthened one does
        /// not decode.
        #[test]
        fn a_history_decodes_from_its_stored_form(
            fixed in (proptest::num::i64::ANY, proptest::num::i64::ANY, proptest::num::i64::ANY),
            changes in proptest::collection::vec((1i64..1000, 0u32..4, proptest::bool::ANY, 0u32..5000), 1..6),
            cut in 1usize..16,
        ) {
            let mut h = KeyHistory { changes: Changes::new(), created: fixed.0, version: fixed.1, lease: fixed.2 };
            let mut main = 0;
            for (step, sub, tomb, size) in changes {
                main += step;
                h.changes.push(Change::new(Revision::new(main, sub as i64), tomb, size));
            }
            let b = h.encode();
            let back = KeyHistory::decode(&b).expect("decodes");
            proptest::prop_assert_eq!(&back.changes[..], &h.changes[..]);
            proptest::prop_assert_eq!((back.created, back.version, back.lease), (h.created, h.version, h.lease));
            proptest::prop_assert!(KeyHistory::decode(&b[..b.len() - cut]).is_none());
            let mut longer = b.clone();
            longer.push(0);
            proptest::prop_assert!(KeyHistory::decode(&longer).is_none());
        }

        /// The bulk builder gives the index that restoring each record in revision order gives.
        #[test]
        fn the_builder_builds_what_restoring_builds(ops in proptest::collection::vec((0u8..6, proptest::bool::ANY, 0i64..3), 0..200)) {
            let mut one_by_one = Index::default();
            let mut built = Builder::default();
            let mut version = std::collections::HashMap::<u8, (i64, i64)>::new();
            for (main, (k, delete, lease)) in (2i64..).zip(ops) {
                let key = [b'k', k];
                let state = version.get(&k).copied();
                if delete && state.is_none() {
                    continue;
                }
                let rev = Revision::new(main, 0);
                let (tomb, created, ver) = if delete {
                    version.remove(&k);
                    (true, 0, 0)
                } else {
                    let (created, v) = state.map(|(c, v)| (c, v + 1)).unwrap_or((main, 1));
                    version.insert(k, (created, v));
                    (false, created, v)
                };
                one_by_one.restore(&key, rev, tomb, created, ver, lease, main as u32);
                built.push(key.to_vec(), rev, tomb, created, ver, lease, main as u32);
            }
            let built = built.finish();
            proptest::prop_assert_eq!(built.live_count(), one_by_one.live_count());
            proptest::prop_assert_eq!(built.len(), one_by_one.len());
            for ((ka, ha), (kb, hb)) in built.range_all(b"", &[0]).zip(one_by_one.range_all(b"", &[0])) {
                proptest::prop_assert_eq!(ka, kb);
                proptest::prop_assert_eq!(&ha.changes[..], &hb.changes[..]);
                proptest::prop_assert_eq!((ha.created, ha.version, ha.lease), (hb.created, hb.version, hb.lease));
            }
        }
    }
}

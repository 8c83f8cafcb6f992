//! content: one file's bytes as a program sees them and as they would survive a power cut.
//!
//! Pure data structure (no I/O), in 4 KiB pages. *Durable* pages hold what the last successful
//! fsync made durable; *dirty* pages the visible content of pages written since; a shrink hides
//! durable bytes past the lowest length reached since the last sync. A sync moves dirty pages into
//! the durable ones; a power cut drops them. A sync that fails (an injected EIO) does what Linux
//! does: the dirty pages stay visible but are *lost*: no later sync writes them, a power cut drops
//! them.
//!
//! Invariants: bytes past `len` read as zero wherever they are kept; bytes of durable pages past
//! `durable_len` are zero.

use std::collections::BTreeMap;

pub const PAGE: u64 = 4096;
type Page = Box<[u8; PAGE as usize]>;

fn zero() -> Page {
    Box::new([0u8; PAGE as usize])
}

#[derive(Default, Debug)]
pub struct Content {
    durable: BTreeMap<u64, Page>,
    durable_len: u64,
    dirty: BTreeMap<u64, Page>,
    /// Written, then a sync of them failed: visible, never made durable.
    lost: BTreeMap<u64, Page>,
    len: u64,
    /// The lowest length since the last sync, if the file shrank: durable bytes from here on are
    /// not visible.
    cut_from: Option<u64>,
}

impl Content {
    /// The visible length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether anything visible would not survive a power cut.
    pub fn unsynced(&self) -> bool {
        !self.dirty.is_empty() || !self.lost.is_empty() || self.len != self.durable_len || self.cut_from.is_some()
    }

    /// Page `p` as it is visible when not dirty.
    fn base_page(&self, p: u64) -> Page {
        if let Some(l) = self.lost.get(&p) {
            return l.clone();
        }
        let mut page = self.durable.get(&p).cloned().unwrap_or_else(zero);
        let hidden = self.cut_from.unwrap_or(u64::MAX).min(self.durable_len);
        let start = p * PAGE;
        if hidden < start + PAGE {
            let from = hidden.saturating_sub(start) as usize;
            page[from..].fill(0);
        }
        page
    }

    fn visible_page(&self, p: u64) -> std::borrow::Cow<'_, Page> {
        match self.dirty.get(&p) {
            Some(d) => std::borrow::Cow::Borrowed(d),
            None => std::borrow::Cow::Owned(self.base_page(p)),
        }
    }

    /// Up to `size` bytes from `off` (fewer at the end of the file).
    pub fn read(&self, off: u64, size: u64) -> Vec<u8> {
        let end = off.saturating_add(size).min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(off) as usize);
        let mut at = off;
        while at < end {
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = ((PAGE - at % PAGE).min(end - at)) as usize;
            out.extend_from_slice(&self.visible_page(p)[in_page..in_page + n]);
            at += n as u64;
        }
        out
    }

    /// Writes `data` at `off`, growing the file as needed.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let mut at = off;
        let mut rest = data;
        while !rest.is_empty() {
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(rest.len());
            if !self.dirty.contains_key(&p) {
                // A lost page written again is dirty again, whole (as in the page cache).
                let base = self.base_page(p);
                self.lost.remove(&p);
                self.dirty.insert(p, base);
            }
            if let Some(page) = self.dirty.get_mut(&p) {
                page[in_page..in_page + n].copy_from_slice(&rest[..n]);
            }
            rest = &rest[n..];
            at += n as u64;
        }
        self.len = self.len.max(off + data.len() as u64);
    }

    /// Truncates or extends (with zeros) to `n` bytes.
    pub fn set_len(&mut self, n: u64) {
        if n < self.len {
            let first_gone = n.div_ceil(PAGE);
            for map in [&mut self.dirty, &mut self.lost] {
                map.retain(|p, _| *p < first_gone);
                if !n.is_multiple_of(PAGE) {
                    if let Some(page) = map.get_mut(&(n / PAGE)) {
                        page[(n % PAGE) as usize..].fill(0);
                    }
                }
            }
            self.cut_from = Some(self.cut_from.map_or(n, |c| c.min(n)));
        }
        self.len = n;
    }

    /// fsync/fdatasync succeeded: what is visible (less what was lost) is durable.
    pub fn sync(&mut self) {
        if let Some(c) = self.cut_from.take() {
            let first_gone = c.div_ceil(PAGE);
            self.durable.retain(|p, _| *p < first_gone);
            if !c.is_multiple_of(PAGE) {
                if let Some(page) = self.durable.get_mut(&(c / PAGE)) {
                    page[(c % PAGE) as usize..].fill(0);
                }
            }
        }
        for (p, page) in std::mem::take(&mut self.dirty) {
            self.durable.insert(p, page);
        }
        self.durable_len = self.len;
        let len = self.len;
        self.durable.retain(|p, _| p * PAGE < len);
        if !len.is_multiple_of(PAGE) {
            if let Some(page) = self.durable.get_mut(&(len / PAGE)) {
                page[(len % PAGE) as usize..].fill(0);
            }
        }
    }

    /// fsync failed: the dirty pages were "written back" and lost (Linux marks them clean).
    pub fn fail_sync(&mut self) {
        for (p, page) in std::mem::take(&mut self.dirty) {
            self.lost.insert(p, page);
        }
    }

    /// Power cut: only what was durable is left.
    pub fn power_cut(&mut self) {
        self.dirty.clear();
        self.lost.clear();
        self.cut_from = None;
        self.len = self.durable_len;
    }

    /// Bytes held in memory (durable and unsynced pages).
    pub fn held(&self) -> u64 {
        (self.durable.len() + self.dirty.len() + self.lost.len()) as u64 * PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetLen(u64),
        Sync,
        FailSync,
        Cut,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..20_000, prop::collection::vec(any::<u8>(), 1..6000)).prop_map(|(o, d)| Op::Write(o, d)),
            2 => (0u64..20_000).prop_map(Op::SetLen),
            2 => Just(Op::Sync),
            1 => Just(Op::FailSync),
            1 => Just(Op::Cut),
        ]
    }

    fn set_len(v: &mut Vec<u8>, n: u64) {
        v.resize(n as usize, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Against a model of two byte vectors: what is visible, and what is durable (the
        /// visible bytes at the last good sync, less pages whose sync failed).
        #[test]
        fn matches_the_model(ops in prop::collection::vec(op(), 1..40)) {
            let mut c = Content::default();
            let mut visible: Vec<u8> = Vec::new();
            let mut durable: Vec<u8> = Vec::new();
            // Pages written since the last sync whose write-back failed: the model keeps, per
            // page, the durable content it must fall back to.
            let mut lost_pages: std::collections::BTreeSet<u64> = Default::default();
            let mut min_len: Option<usize> = None;
            for o in &ops {
                match o {
                    Op::Write(off, d) => {
                        let end = *off as usize + d.len();
                        if visible.len() < end { visible.resize(end, 0); }
                        visible[*off as usize..end].copy_from_slice(d);
                        for p in off / PAGE..=(end as u64 - 1) / PAGE { lost_pages.remove(&p); }
                        c.write(*off, d);
                    }
                    Op::SetLen(n) => {
                        if (*n as usize) < visible.len() {
                            min_len = Some(min_len.map_or(*n as usize, |m| m.min(*n as usize)));
                            lost_pages.retain(|p| *p < n.div_ceil(PAGE));
                        }
                        set_len(&mut visible, *n);
                        c.set_len(*n);
                    }
                    Op::Sync => {
                        // Lost pages keep their durable bytes (the model takes them from the old
                        // durable copy); every other byte is as visible.
                        let mut next = visible.clone();
                        for p in &lost_pages {
                            let (s, e) = ((p * PAGE) as usize, ((p + 1) * PAGE) as usize);
                            for (i, b) in next.iter_mut().enumerate().take(e).skip(s) {
                                let cut = min_len.is_some_and(|m| i >= m);
                                *b = if cut { 0 } else { durable.get(i).copied().unwrap_or(0) };
                            }
                        }
                        durable = next;
                        // Lost pages stay lost (clean in the page cache) until written again.
                        min_len = None;
                        c.sync();
                    }
                    Op::FailSync => {
                        // The pages dirty now: the ones whose visible bytes differ from durable
                        // or that were written; the model marks every page in the visible range
                        // that the structure holds as dirty.
                        for p in c.dirty.keys() { lost_pages.insert(*p); }
                        c.fail_sync();
                    }
                    Op::Cut => {
                        visible = durable.clone();
                        lost_pages.clear();
                        min_len = None;
                        c.power_cut();
                    }
                }
                prop_assert_eq!(c.len(), visible.len() as u64);
                prop_assert_eq!(c.read(0, u64::MAX), visible.clone());
            }
            // Whatever the history, a cut leaves what the model says is durable.
            c.power_cut();
            visible = durable.clone();
            prop_assert_eq!(c.read(0, u64::MAX), visible);
        }
    }

    #[test]
    fn unsynced_data_and_shrinks_vanish_in_a_cut() {
        let mut c = Content::default();
        c.write(0, b"hello world");
        c.sync();
        c.write(6, b"there");
        c.set_len(3);
        assert_eq!(c.read(0, 100), b"hel");
        c.set_len(8);
        assert_eq!(c.read(0, 100), b"hel\0\0\0\0\0");
        c.power_cut();
        assert_eq!(c.read(0, 100), b"hello world");
        // A sync that failed is not made durable by a later one.
        c.write(0, b"J");
        c.fail_sync();
        assert_eq!(c.read(0, 1), b"J");
        c.sync();
        c.power_cut();
        assert_eq!(c.read(0, 100), b"hello world");
    }
}

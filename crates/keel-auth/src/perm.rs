//! Key-range permissions as sets of half-open intervals, merged per user and permission type.
//!
//! A permission on a single key `k` is the interval `[k, k\0)`; a `range_end` of `"\0"` means "to
//! the end of the key space". A point request is allowed when some interval holds the key; a range
//! request when the union of the intervals covers the whole range (etcd's rules).

/// The end of an interval: a key (exclusive), or the end of the key space.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum End {
    Key(Vec<u8>),
    Infinite,
}

/// A sorted, non-overlapping, non-adjacent set of intervals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ivs: Vec<(Vec<u8>, End)>,
}

/// The interval a permission (or request) names: `range_end` empty means the single key,
/// `"\0"` means from `key` on.
pub fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), End::Key(end))
    } else if range_end == [0] {
        (key.to_vec(), End::Infinite)
    } else {
        (key.to_vec(), End::Key(range_end.to_vec()))
    }
}

fn end_gt(e: &End, key: &[u8]) -> bool {
    match e {
        End::Infinite => true,
        End::Key(k) => k.as_slice() > key,
    }
}

impl RangeSet {
    /// Builds the union of `ivs`.
    pub fn from_intervals(mut ivs: Vec<(Vec<u8>, End)>) -> RangeSet {
        ivs.retain(|(s, e)| end_gt(e, s));
        ivs.sort();
        let mut out: Vec<(Vec<u8>, End)> = Vec::with_capacity(ivs.len());
        for (s, e) in ivs {
            if let Some(last) = out.last_mut() {
                // Overlapping or touching: extend the last interval.
                if !end_gt(&last.1, &s) && last.1 != End::Key(s.clone()) {
                    out.push((s, e));
                } else if e > last.1 {
                    last.1 = e;
                }
                continue;
            }
            out.push((s, e));
        }
        RangeSet { ivs: out }
    }

    /// The interval that starts at or before `key`, if any.
    fn at_or_before(&self, key: &[u8]) -> Option<&(Vec<u8>, End)> {
        let idx = self.ivs.partition_point(|(s, _)| s.as_slice() <= key);
        idx.checked_sub(1).map(|i| &self.ivs[i])
    }

    /// True when `key` lies in the set.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.at_or_before(key).is_some_and(|(_, e)| end_gt(e, key))
    }

    /// True when the whole of `[key, end)` lies in the set (merged intervals: one must cover it).
    pub fn covers(&self, key: &[u8], end: &End) -> bool {
        match self.at_or_before(key) {
            Some((_, e)) => end_gt(e, key) && e >= end,
            None => false,
        }
    }

    /// True when the request `key`/`range_end` (etcd's encoding) is allowed.
    pub fn allows(&self, key: &[u8], range_end: &[u8]) -> bool {
        if range_end.is_empty() {
            return self.contains_key(key);
        }
        let (s, e) = interval(key, range_end);
        if let End::Key(k) = &e {
            if k.as_slice() <= s.as_slice() {
                // An empty range reads nothing; etcd's interval tree finds it covered only when
                // some interval holds its start.
                return self.contains_key(&s);
            }
        }
        self.covers(&s, &e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(perms: &[(&[u8], &[u8])]) -> RangeSet {
        RangeSet::from_intervals(perms.iter().map(|(k, e)| interval(k, e)).collect())
    }

    #[test]
    fn single_keys_and_ranges() {
        let s = set(&[(b"foo", b""), (b"a", b"c")]);
        assert!(s.allows(b"foo", b""));
        assert!(!s.allows(b"foo0", b""));
        assert!(!s.allows(b"fo", b""));
        assert!(s.allows(b"a", b"c"));
        assert!(s.allows(b"b", b"bz"));
        assert!(!s.allows(b"b", b"d"));
        assert!(s.allows(b"foo", b"foo\0"));
        assert!(!s.allows(b"foo", b"fop"));
    }

    #[test]
    fn adjacent_intervals_merge() {
        let s = set(&[(b"a", b"b"), (b"b", b"c"), (b"c", b"")]);
        assert!(s.allows(b"a", b"c\0"));
        assert!(!s.allows(b"a", b"c\x01"));
    }

    #[test]
    fn open_ended() {
        let s = set(&[(b"z", b"\0")]);
        assert!(s.allows(b"z1", b""));
        assert!(s.allows(b"\xff\xff", b""));
        assert!(s.allows(b"z", b"\0"));
        assert!(!s.allows(b"y", b""));
        assert!(!s.allows(b"y", b"\0"));
        let all = set(&[(b"", b"\0")]);
        assert!(all.allows(b"\0", b"\0"));
        assert!(all.allows(b"", b""));
    }

    #[test]
    fn empty_set_allows_nothing() {
        let s = RangeSet::default();
        assert!(!s.allows(b"a", b""));
        assert!(!s.allows(b"a", b"b"));
    }
}

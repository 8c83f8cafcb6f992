//! Revisions: (main, sub) pairs and their 17-byte big-endian backend encoding.

/// A point in the store's history: `main` counts write transactions, `sub` the changes inside one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Length of an encoded revision: main (8) + `_` + sub (8).
pub const REV_BYTES: usize = 17;
/// Marker appended to a tombstone's backend key.
pub const TOMBSTONE_MARK: u8 = b't';

impl Revision {
    pub fn new(main: i64, sub: i64) -> Self {
        Revision { main, sub }
    }

    /// Backend key: `main BE | '_' | sub BE`, plus `'t'` for a tombstone. Sorts in revision order.
    pub fn to_key(self, tombstone: bool) -> Vec<u8> {
        let mut k = Vec::with_capacity(REV_BYTES + 1);
        k.extend_from_slice(&self.main.to_be_bytes());
        k.push(b'_');
        k.extend_from_slice(&self.sub.to_be_bytes());
        if tombstone {
            k.push(TOMBSTONE_MARK);
        }
        k
    }

    /// The backend key of a change that is not a tombstone, without allocating.
    pub fn key_bytes(self) -> [u8; REV_BYTES] {
        let mut k = [0u8; REV_BYTES];
        k[..8].copy_from_slice(&self.main.to_be_bytes());
        k[8] = b'_';
        k[9..].copy_from_slice(&self.sub.to_be_bytes());
        k
    }

    /// Parses a backend key; returns the revision and whether it marks a tombstone.
    pub fn from_key(k: &[u8]) -> Option<(Revision, bool)> {
        if k.len() != REV_BYTES && k.len() != REV_BYTES + 1 {
            return None;
        }
        let main = i64::from_be_bytes(k[0..8].try_into().ok()?);
        let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
        let tomb = k.len() == REV_BYTES + 1;
        if tomb && k[REV_BYTES] != TOMBSTONE_MARK {
            return None;
        }
        Some((Revision { main, sub }, tomb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_is_revision_order() {
        let a = Revision::new(1, 5).to_key(false);
        let b = Revision::new(2, 0).to_key(true);
        let c = Revision::new(2, 1).to_key(false);
        assert!(a < b && b < c);
        assert_eq!(Revision::from_key(&b), Some((Revision::new(2, 0), true)));
        assert_eq!(Revision::new(2, 1).key_bytes().to_vec(), c);
    }
}

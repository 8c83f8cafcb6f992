//! bbolt 1.3's page layout. A file is a sequence of pages of `page_size` bytes; pages 0 and 1
//! are metas (the valid one with the higher transaction id is current), one page holds the
//! freelist, the rest are branch and leaf pages of B+trees, a page with `overflow = n` spanning
//! n + 1 pages. Every page starts with a 16-byte header: id u64, flags u16, count u16, overflow
//! u32.

/// Header bytes at the start of every page (and of an inline bucket's page).
pub const HEADER: usize = 16;
/// Bytes of one branch or leaf element.
pub const ELEMENT: usize = 16;
/// Bytes of a bucket header (root page id, sequence) at the start of a bucket's value.
pub const BUCKET_HEADER: usize = 16;

pub const BRANCH: u16 = 0x01;
pub const LEAF: u16 = 0x02;
pub const META: u16 = 0x04;
pub const FREELIST: u16 = 0x10;
/// A leaf element whose value is a nested bucket.
pub const BUCKET_LEAF: u32 = 0x01;

pub const MAGIC: u32 = 0xED0C_DAED;
pub const VERSION: u32 = 2;
/// Bytes of a meta record (after the page header); the checksum covers the first 56.
pub const META_BYTES: usize = 64;
/// The freelist page id of a database that does not store its freelist.
pub const NO_FREELIST: u64 = u64::MAX;
/// A freelist count of 0xFFFF means the real count is the first u64 after the header.
pub const FREELIST_COUNT_OVERFLOW: u16 = 0xFFFF;

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u64,
    pub flags: u16,
    pub count: u16,
    pub overflow: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        Some(Header { id: u64_at(b, 0)?, flags: u16_at(b, 8)?, count: u16_at(b, 10)?, overflow: u32_at(b, 12)? })
    }

    pub fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..10].copy_from_slice(&self.flags.to_le_bytes());
        out[10..12].copy_from_slice(&self.count.to_le_bytes());
        out[12..16].copy_from_slice(&self.overflow.to_le_bytes());
    }
}

/// The meta record of page 0 or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub page_size: u32,
    pub flags: u32,
    /// The root bucket's root page.
    pub root: u64,
    pub sequence: u64,
    pub freelist: u64,
    /// The high-water mark: pages at and above it are not in use.
    pub pgid: u64,
    pub txid: u64,
}

impl Meta {
    /// Parses and checks a meta record (the bytes after a meta page's header).
    pub fn parse(b: &[u8]) -> Result<Meta, String> {
        let short = || "meta record is truncated".to_string();
        let magic = u32_at(b, 0).ok_or_else(short)?;
        if magic != MAGIC {
            return Err(format!("not a bbolt file (magic {magic:#x})"));
        }
        let version = u32_at(b, 4).ok_or_else(short)?;
        if version != VERSION {
            return Err(format!("unsupported bbolt version {version}"));
        }
        let sum = u64_at(b, 56).ok_or_else(short)?;
        if fnv64a(&b[..56]) != sum {
            return Err("meta checksum mismatch".into());
        }
        Ok(Meta {
            page_size: u32_at(b, 8).ok_or_else(short)?,
            flags: u32_at(b, 12).ok_or_else(short)?,
            root: u64_at(b, 16).ok_or_else(short)?,
            sequence: u64_at(b, 24).ok_or_else(short)?,
            freelist: u64_at(b, 32).ok_or_else(short)?,
            pgid: u64_at(b, 40).ok_or_else(short)?,
            txid: u64_at(b, 48).ok_or_else(short)?,
        })
    }

    /// The 64 bytes of this record, checksum included.
    pub fn encode(&self) -> [u8; META_BYTES] {
        let mut b = [0u8; META_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.root.to_le_bytes());
        b[24..32].copy_from_slice(&self.sequence.to_le_bytes());
        b[32..40].copy_from_slice(&self.freelist.to_le_bytes());
        b[40..48].copy_from_slice(&self.pgid.to_le_bytes());
        b[48..56].copy_from_slice(&self.txid.to_le_bytes());
        let sum = fnv64a(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }
}

/// 64-bit FNV-1a, bbolt's meta checksum.
pub fn fnv64a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_detects_damage() {
        let m = Meta { page_size: 4096, flags: 0, root: 3, sequence: 0, freelist: 2, pgid: 9, txid: 7 };
        let mut b = m.encode();
        assert_eq!(Meta::parse(&b), Ok(m));
        b[20] ^= 1;
        assert_eq!(Meta::parse(&b), Err("meta checksum mismatch".into()));
    }
}

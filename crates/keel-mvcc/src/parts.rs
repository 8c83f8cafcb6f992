//! Records longer than a page of table `key`, stored as page-sized parts.
//!
//! redb keeps each leaf entry whole in one page, and a page is 4 KiB times a power of two: a
//! record of 16 KiB and a few bytes takes a 32 KiB page of its own (Keel's file was 1.8x etcd's
//! with 16 KiB values). So a record longer than [`PART_BYTES`] is split: its first
//! `len / PART_BYTES` parts of exactly [`PART_BYTES`] bytes go to table `key_part`, keyed by the
//! record's revision key and the part's number (u32, big-endian), each filling one 4 KiB page;
//! table `key` holds, under the record's own key, a marker followed by the rest (the tail,
//! shorter than a part, which packs into `key`'s pages with its neighbours). The marker is byte 0
//! (a stored mvccpb.KeyValue never begins with it: no protobuf field has number 0), the record's
//! length and its number of parts, both u32 big-endian. Table `key` keeps one entry per record,
//! in revision order, as before.
//!
//! A record that fits stays as it is, so files written before this layout read unchanged. The
//! backend writes, deletes and reads every `key` entry through this module, in its own
//! transactions; a missing or short part is reported with the record's revision key.
//!
//! Owns the layout of parts and markers. Called by the backend; calls redb.

use redb::{ReadableTable, Table, TableDefinition};
use std::borrow::Cow;

/// Table `key_part`: the full parts of long records.
pub(crate) const PARTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key_part");

/// Bytes of a full part: the most one entry of `key_part` holds in an order-0 (4 KiB) redb leaf
/// page, which needs 4 bytes of header and 8 of lengths besides the part's key (a revision key of
/// up to 18 bytes and 4 bytes of number), less two bytes of slack.
pub(crate) const PART_BYTES: usize = 4096 - 4 - 8 - 22 - 2;

/// Marker byte, then length and number of parts.
const MARKER_BYTES: usize = 9;

/// What a marker says of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Marker {
    len: usize,
    parts: u32,
}

impl Marker {
    /// The marker at the head of `key` entry `v`, if it has one (its length and part count are
    /// checked against the parts and tail by [`record`]).
    fn of(v: &[u8]) -> Option<Marker> {
        if v.len() < MARKER_BYTES || v[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes(v[1..5].try_into().ok()?) as usize;
        let parts = u32::from_be_bytes(v[5..9].try_into().ok()?);
        Some(Marker { len, parts })
    }
}

/// The key of part `n` of the record at revision key `k`.
fn part_key(k: &[u8], n: u32) -> Vec<u8> {
    let mut pk = Vec::with_capacity(k.len() + 4);
    pk.extend_from_slice(k);
    pk.extend_from_slice(&n.to_be_bytes());
    pk
}

/// Removes the parts the `key` entry `old` (replaced or removed) pointed to.
fn drop_parts(parts: &mut Table<&[u8], &[u8]>, k: &[u8], old: Option<Marker>) -> Result<(), redb::Error> {
    if let Some(m) = old.filter(|m| m.parts > 0) {
        let (lo, hi) = (part_key(k, 0), part_key(k, m.parts));
        parts.retain_in::<&[u8], _>(lo.as_slice()..hi.as_slice(), |_, _| false)?;
    }
    Ok(())
}

/// The full parts of a record with their `key_part` keys, in key order.
pub(crate) type Parts<'v> = Vec<(Vec<u8>, &'v [u8])>;

/// What record `v` at revision key `k` is stored as: its `key` entry (`v` itself, or a marker
/// and the tail) and its full parts.
pub(crate) fn split<'v>(k: &[u8], v: &'v [u8]) -> Result<(Cow<'v, [u8]>, Parts<'v>), redb::Error> {
    if v.len() <= PART_BYTES {
        return Ok((Cow::Borrowed(v), Vec::new()));
    }
    let full = v.len() / PART_BYTES;
    let len = u32::try_from(v.len()).map_err(|_| redb::Error::ValueTooLarge(v.len()))?;
    // full < len, so it fits too.
    let n = full as u32;
    let mut entry = Vec::with_capacity(MARKER_BYTES + v.len() - full * PART_BYTES);
    entry.push(0);
    entry.extend_from_slice(&len.to_be_bytes());
    entry.extend_from_slice(&n.to_be_bytes());
    entry.extend_from_slice(&v[full * PART_BYTES..]);
    let parts = v[..full * PART_BYTES].chunks(PART_BYTES).enumerate().map(|(i, chunk)| (part_key(k, i as u32), chunk)).collect();
    Ok((Cow::Owned(entry), parts))
}

/// Stores record `v` at revision key `k` (replacing what was there, parts included).
pub(crate) fn put(keys: &mut Table<&[u8], &[u8]>, parts: &mut Table<&[u8], &[u8]>, k: &[u8], v: &[u8]) -> Result<(), redb::Error> {
    let (entry, new_parts) = split(k, v)?;
    let old = keys.insert(k, entry.as_ref())?.and_then(|g| Marker::of(g.value()));
    drop_parts(parts, k, old)?;
    for (pk, chunk) in new_parts {
        parts.insert(pk.as_slice(), chunk)?;
    }
    Ok(())
}

/// Removes the record at revision key `k`, parts included; false when there was none.
pub(crate) fn remove(keys: &mut Table<&[u8], &[u8]>, parts: &mut Table<&[u8], &[u8]>, k: &[u8]) -> Result<bool, redb::Error> {
    let Some(old) = keys.remove(k)?.map(|g| Marker::of(g.value())) else { return Ok(false) };
    drop_parts(parts, k, old)?;
    Ok(true)
}

/// The record the `key` entry `v` at revision key `k` stands for: `v` itself, or its parts read
/// from `parts` followed by its tail. An error (text) names what is missing.
pub(crate) fn record<'v>(parts: &impl ReadableTable<&'static [u8], &'static [u8]>, k: &[u8], v: &'v [u8]) -> Result<Cow<'v, [u8]>, String> {
    let Some(m) = Marker::of(v) else { return Ok(Cow::Borrowed(v)) };
    let tail = &v[MARKER_BYTES..];
    let bad = |what: String| format!("record at revision key {:?} in table key: {what}", k.escape_ascii().to_string());
    let mut out = Vec::with_capacity(m.len);
    let (lo, hi) = (part_key(k, 0), part_key(k, m.parts));
    let mut n = 0u32;
    for item in parts.range::<&[u8]>(lo.as_slice()..hi.as_slice()).map_err(|e| bad(e.to_string()))? {
        let (pk, pv) = item.map_err(|e| bad(e.to_string()))?;
        if pk.value() != part_key(k, n).as_slice() {
            return Err(bad(format!("part {n} of {} is missing from table key_part", m.parts)));
        }
        out.extend_from_slice(pv.value());
        n += 1;
    }
    out.extend_from_slice(tail);
    if n != m.parts || out.len() != m.len {
        return Err(bad(format!(
            "{} parts of {} bytes in table key_part and tail expected, {n} parts and {} bytes found",
            m.parts,
            m.len,
            out.len()
        )));
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key");

    fn db() -> (tempfile::TempDir, redb::Database) {
        let d = tempfile::tempdir().unwrap();
        let db = redb::Database::create(d.path().join("db")).unwrap();
        (d, db)
    }

    fn value(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn read(db: &redb::Database, k: &[u8]) -> Option<Vec<u8>> {
        let tx = redb::ReadableDatabase::begin_read(db).unwrap();
        let keys = tx.open_table(KEYS).unwrap();
        let parts = tx.open_table(PARTS).unwrap();
        let v = keys.get(k).unwrap()?;
        Some(record(&parts, k, v.value()).unwrap().into_owned())
    }

    fn parts_len(db: &redb::Database) -> u64 {
        let tx = redb::ReadableDatabase::begin_read(db).unwrap();
        redb::ReadableTableMetadata::len(&tx.open_table(PARTS).unwrap()).unwrap()
    }

    fn write(db: &redb::Database, f: impl FnOnce(&mut Table<&[u8], &[u8]>, &mut Table<&[u8], &[u8]>)) {
        let tx = db.begin_write().unwrap();
        {
            let mut keys = tx.open_table(KEYS).unwrap();
            let mut parts = tx.open_table(PARTS).unwrap();
            f(&mut keys, &mut parts);
        }
        tx.commit().unwrap();
    }

    /// Every length around the part size reads back as written, replacing one record by a
    /// longer or shorter one leaves no part behind, and removing every record leaves none.
    #[test]
    fn records_of_any_length_read_back_and_leave_no_parts() {
        let (_d, db) = db();
        let lens = [0, 1, 100, PART_BYTES - 1, PART_BYTES, PART_BYTES + 1, 2 * PART_BYTES, 2 * PART_BYTES + 7, 16_434, 100_000];
        let key = |i: usize| format!("{i:017}").into_bytes();
        write(&db, |keys, parts| {
            for (i, &len) in lens.iter().enumerate() {
                put(keys, parts, &key(i), &value(len, i as u8)).unwrap();
            }
        });
        for (i, &len) in lens.iter().enumerate() {
            assert_eq!(read(&db, &key(i)), Some(value(len, i as u8)), "length {len}");
        }
        let full: u64 = lens.iter().map(|l| (if *l > PART_BYTES { l / PART_BYTES } else { 0 }) as u64).sum();
        assert_eq!(parts_len(&db), full);
        // Each record replaced by the next one's length (the last by the first's).
        write(&db, |keys, parts| {
            for i in 0..lens.len() {
                put(keys, parts, &key(i), &value(lens[(i + 1) % lens.len()], 7)).unwrap();
            }
        });
        for i in 0..lens.len() {
            assert_eq!(read(&db, &key(i)), Some(value(lens[(i + 1) % lens.len()], 7)));
        }
        assert_eq!(parts_len(&db), full, "a replaced record's parts are dropped");
        write(&db, |keys, parts| {
            for i in 0..lens.len() {
                assert!(remove(keys, parts, &key(i)).unwrap());
            }
            assert!(!remove(keys, parts, &key(0)).unwrap());
        });
        assert_eq!(parts_len(&db), 0, "a removed record's parts are dropped");
    }

    /// A record whose part is gone is reported with its revision key, not read short.
    #[test]
    fn a_missing_part_is_reported() {
        let (_d, db) = db();
        write(&db, |keys, parts| put(keys, parts, b"rev", &value(3 * PART_BYTES + 5, 1)).unwrap());
        write(&db, |_, parts| {
            parts.remove(part_key(b"rev", 1).as_slice()).unwrap();
        });
        let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
        let keys = tx.open_table(KEYS).unwrap();
        let parts = tx.open_table(PARTS).unwrap();
        let v = keys.get(b"rev".as_slice()).unwrap().unwrap();
        let e = record(&parts, b"rev", v.value()).unwrap_err();
        assert!(e.contains("rev") && e.contains("part 1 of 3"), "{e}");
    }
}

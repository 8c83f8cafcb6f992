//! The WAL format Keel wrote before it wrote etcd's, read only, so that a member started on a
//! data dir of an older Keel can have its log rewritten in etcd's format (by keel-raft, which
//! knows what the records mean).
//!
//! Layout, every record 8-byte aligned: `len: u32 LE | crc32c(type|payload): u32 LE | type: u8 |
//! payload | zero padding`; `len` counts type and payload; a zero `len` ends a segment. Record
//! types are the same numbers as etcd's. A torn last record of the last segment (it runs past
//! the end of the file, or fails its checksum with nothing intact after it) ends the log; any
//! other damage is an error naming file and offset.

use crate::wal::{list_segments, Record};
use crate::{io_err, Error, Result};
use std::path::Path;

const HEADER: usize = 8;

fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// True when the first segment in `dir` is in the old format. Its first record is the metadata
/// record, whose type byte follows the 8-byte header; etcd's first frame has a protobuf tag
/// (0x08) there and zeros in bytes 4-6 of its length field.
pub fn is_legacy(dir: &Path) -> Result<bool> {
    let Some(first) = list_segments(dir)?.into_iter().next() else { return Ok(false) };
    let path = dir.join(first.file_name());
    let mut head = [0u8; 9];
    use std::io::Read;
    let n = std::fs::File::open(&path).and_then(|mut f| f.read(&mut head)).map_err(io_err(&path))?;
    Ok(n == 9 && head[8] == crate::wal::RECORD_METADATA && head[4..7] != [0, 0, 0])
}

/// Every record of the old-format WAL in `dir`, in order (nothing is changed on disk).
pub fn read(dir: &Path) -> Result<Vec<Record>> {
    let segments = list_segments(dir)?;
    let mut all = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let path = dir.join(seg.file_name());
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let (records, damage) = scan(&bytes);
        if let Some((offset, reason, torn)) = damage {
            if !(torn && i + 1 == segments.len()) {
                return Err(Error::Corrupt { path, offset, reason });
            }
            tracing::warn!(file = %path.display(), offset, reason = %reason, "wal: torn last record of the old-format WAL ignored");
        }
        all.extend(records);
    }
    Ok(all)
}

/// Appends one record in the old format to `buf` (for tests of the upgrade; Keel writes
/// etcd's format).
pub fn encode(buf: &mut Vec<u8>, kind: u8, data: &[u8]) {
    let len = 1 + data.len();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), data);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(data);
    buf.resize(buf.len() + padded(len) - len, 0);
}

type Damage = Option<(u64, String, bool)>;

fn scan(bytes: &[u8]) -> (Vec<Record>, Damage) {
    let mut records = Vec::new();
    let mut off = 0usize;
    loop {
        let Some(head) = bytes.get(off..off + HEADER) else {
            let rest = bytes.get(off..).unwrap_or(&[]);
            let damage = (!rest.iter().all(|b| *b == 0)).then(|| (off as u64, "partial record header".to_string(), true));
            return (records, damage);
        };
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or([0; 4])) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap_or([0; 4]));
        if len == 0 {
            let damage =
                (!bytes[off..].iter().all(|b| *b == 0)).then(|| (off as u64, "zero-length record followed by data".to_string(), false));
            return (records, damage);
        }
        let start = off + HEADER;
        if start + len > bytes.len() {
            let torn = !intact_record_after(bytes, off);
            return (records, Some((off as u64, format!("record of {len} bytes runs past the end of the file"), torn)));
        }
        let body = &bytes[start..start + len];
        if crc32c::crc32c(body) != crc {
            let end = (start + padded(len)).min(bytes.len());
            let torn = bytes[end..].iter().all(|b| *b == 0) && !intact_record_after(bytes, off);
            return (records, Some((off as u64, format!("crc mismatch (stored {crc:#010x})"), torn)));
        }
        records.push(Record { kind: body[0], data: body[1..].to_vec() });
        off = start + padded(len);
    }
}

fn intact_record_after(bytes: &[u8], off: usize) -> bool {
    let mut at = off + 8;
    while at + HEADER <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
        if len > 0 && at + HEADER + len <= bytes.len() {
            let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or([0; 4]));
            if crc32c::crc32c(&bytes[at + HEADER..at + HEADER + len]) == crc {
                return true;
            }
        }
        at += 8;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_format_wal_is_recognised_and_read() {
        let d = tempfile::tempdir().unwrap();
        let mut b = Vec::new();
        encode(&mut b, 1, &[0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1]);
        encode(&mut b, 2, b"entry one");
        encode(&mut b, 3, b"state");
        let torn_at = b.len();
        encode(&mut b, 2, b"entry two, torn");
        b.truncate(torn_at + 12);
        b.resize(4096, 0);
        std::fs::write(d.path().join("0000000000000000-0000000000000000.wal"), &b).unwrap();
        assert!(is_legacy(d.path()).unwrap());
        let recs = read(d.path()).unwrap();
        assert_eq!(recs.iter().map(|r| r.kind).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(recs[1].data, b"entry one");
    }
}

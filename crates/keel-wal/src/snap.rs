//! Snapshot files: `%016x-%016x.snap` (term-index) in etcd's format: a `snappb.Snapshot`
//! protobuf (field 1 the CRC-32C of the data, field 2 the data: raft's snapshot message), so that
//! etcd starts on a Keel member's directory and Keel on an etcd member's. Files of earlier Keel
//! builds (`crc32c: u32 LE | data`) are still read.

use crate::{io_err, sync_dir, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// How many snapshot files are kept (etcd's `--max-snapshots` default).
const KEEP: usize = 5;

/// A snapshot read back from disk.
#[derive(Debug, Clone)]
pub struct SnapFile {
    pub term: u64,
    pub index: u64,
    pub data: Vec<u8>,
}

/// Writes and reads the snapshot files of one member.
pub struct Snapshotter {
    dir: PathBuf,
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (a, b) = stem.split_once('-')?;
    if a.len() != 16 || b.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
}

impl Snapshotter {
    pub fn new(dir: &Path) -> Result<Snapshotter> {
        crate::create_dir_all_durable(dir)?;
        Ok(Snapshotter { dir: dir.to_path_buf() })
    }

    /// Durably writes a snapshot file, then removes the oldest beyond the five newest.
    pub fn save(&self, term: u64, index: u64, data: &[u8]) -> Result<()> {
        let t0 = std::time::Instant::now();
        let name = format!("{term:016x}-{index:016x}.snap");
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(&name);
        let bytes = prost::Message::encode_to_vec(&SnapPb { crc: crc32c::crc32c(data), data: data.to_vec() });
        {
            use std::io::Write;
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            let f0 = std::time::Instant::now();
            f.sync_all().map_err(io_err(&tmp))?;
            if let Some(observe) = crate::SNAP_OBSERVER.get() {
                observe(t0.elapsed(), f0.elapsed());
            }
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("snap::save", |_| std::process::abort());
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        let mut names = self.names()?;
        while names.len() > KEEP {
            let (_, _, old) = names.remove(0);
            let p = self.dir.join(old);
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// Rewrites snapshot files an earlier Keel wrote in etcd's format (each crash-safe: written
    /// beside, synced, renamed over); returns how many. Damaged files are left as they are.
    pub fn rewrite_older_files(&self) -> Result<usize> {
        let mut n = 0;
        for (_, _, name) in self.names()? {
            let path = self.dir.join(&name);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let is_etcds = <SnapPb as prost::Message>::decode(bytes.as_slice()).is_ok_and(|pb| crc32c::crc32c(&pb.data) == pb.crc);
            if is_etcds {
                continue;
            }
            let Some(data) = decode(bytes) else { continue };
            let tmp = self.dir.join(format!("{name}.tmp"));
            {
                use std::io::Write;
                let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
                f.write_all(&prost::Message::encode_to_vec(&SnapPb { crc: crc32c::crc32c(&data), data })).map_err(io_err(&tmp))?;
                f.sync_all().map_err(io_err(&tmp))?;
            }
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(n)
    }

    /// Removes the partial files a crash left in the snapshot directory (names ending `.tmp`:
    /// a snapshot file being written, a backend being received from the leader or staged for a
    /// peer), as etcd removes its leftover `db.tmp` files at start; returns how many. Only at a
    /// member's start, before anything writes here.
    pub fn remove_partial_files(&self) -> Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".tmp") || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = e.path();
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(io_err(&path))?;
            tracing::info!(path = %path.display(), bytes, "removed a partial file left by a crash");
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(n)
    }

    /// Snapshot files sorted oldest first, as (term, index, file name).
    fn names(&self) -> Result<Vec<(u64, u64, String)>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let ent = ent.map_err(io_err(&self.dir))?;
            let name = ent.file_name().to_string_lossy().to_string();
            if let Some((t, i)) = parse_name(&name) {
                out.push((t, i, name));
            }
        }
        out.sort_by_key(|(t, i, _)| (*i, *t));
        Ok(out)
    }

    /// Loads the newest snapshot whose checksum holds. A damaged file is renamed `*.broken` (as
    /// etcd does) with a warning and the next older one is tried.
    pub fn load_newest(&self) -> Result<Option<SnapFile>> {
        let names = self.names()?;
        for (term, index, name) in names.into_iter().rev() {
            let path = self.dir.join(&name);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            if let Some(data) = decode(bytes) {
                return Ok(Some(SnapFile { term, index, data }));
            }
            tracing::warn!(file = %path.display(), "snap: checksum mismatch; renaming to .broken");
            let broken = self.dir.join(format!("{name}.broken"));
            fs::rename(&path, &broken).map_err(io_err(&broken))?;
        }
        Ok(None)
    }
}

/// etcd's `snappb.Snapshot`.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapPb {
    #[prost(uint32, tag = "1")]
    crc: u32,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

/// A snapshot file's data when its checksum holds: etcd's format, else an earlier Keel's.
fn decode(bytes: Vec<u8>) -> Option<Vec<u8>> {
    if let Ok(pb) = <SnapPb as prost::Message>::decode(bytes.as_slice()) {
        if crc32c::crc32c(&pb.data) == pb.crc && !(pb.data.is_empty() && bytes.len() > 8) {
            return Some(pb.data);
        }
    }
    let crc = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?);
    (crc32c::crc32c(&bytes[4..]) == crc).then(|| bytes[4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_valid_wins() {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(d.path()).unwrap();
        for i in 1..=7u64 {
            s.save(2, i * 10, format!("snap{i}").as_bytes()).unwrap();
        }
        assert_eq!(s.names().unwrap().len(), KEEP);
        let got = s.load_newest().unwrap().unwrap();
        assert_eq!((got.term, got.index, got.data), (2, 70, b"snap7".to_vec()));
        // Damage the newest: the one before it is used.
        let p = d.path().join(format!("{:016x}-{:016x}.snap", 2, 70));
        let mut b = fs::read(&p).unwrap();
        b[5] ^= 1;
        fs::write(&p, b).unwrap();
        let got = s.load_newest().unwrap().unwrap();
        assert_eq!(got.index, 60);
    }

    #[test]
    fn partial_files_a_crash_left_are_removed_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(d.path()).unwrap();
        s.save(2, 10, b"kept").unwrap();
        fs::write(d.path().join("db"), b"backend").unwrap();
        fs::write(d.path().join("db.defrag"), b"a defragment's copy").unwrap();
        for name in ["0000000000000010.snap.db.tmp", "0000000000000010.snap.bolt.tmp", "0000000000000010.snap.db.to-abc.tmp"] {
            fs::write(d.path().join(name), b"partial").unwrap();
        }
        assert_eq!(s.remove_partial_files().unwrap(), 3);
        let mut left: Vec<String> =
            fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, vec!["0000000000000002-000000000000000a.snap", "db", "db.defrag"]);
        assert_eq!(s.remove_partial_files().unwrap(), 0);
    }

    #[test]
    fn files_are_etcds_snappb_and_earlier_keel_files_still_read() {
        let d = tempfile::tempdir().unwrap();
        let s = Snapshotter::new(d.path()).unwrap();
        s.save(3, 20, b"raft snapshot").unwrap();
        let b = fs::read(d.path().join(format!("{:016x}-{:016x}.snap", 3, 20))).unwrap();
        // etcd's snappb.Snapshot: field 1 (varint) the CRC-32C, field 2 (bytes) the data.
        let crc = crc32c::crc32c(b"raft snapshot");
        let mut want = vec![0x08];
        let mut v = crc as u64;
        while v >= 0x80 {
            want.push((v as u8) | 0x80);
            v >>= 7;
        }
        want.push(v as u8);
        want.extend_from_slice(&[0x12, 13]);
        want.extend_from_slice(b"raft snapshot");
        assert_eq!(b, want);
        // A file an earlier Keel wrote, newer: read.
        let mut old = crc32c::crc32c(b"older format").to_le_bytes().to_vec();
        old.extend_from_slice(b"older format");
        fs::write(d.path().join(format!("{:016x}-{:016x}.snap", 3, 30)), old).unwrap();
        let got = s.load_newest().unwrap().unwrap();
        assert_eq!((got.index, got.data), (30, b"older format".to_vec()));
        assert_eq!(s.rewrite_older_files().unwrap(), 1);
        assert_eq!(s.rewrite_older_files().unwrap(), 0);
        let b = fs::read(d.path().join(format!("{:016x}-{:016x}.snap", 3, 30))).unwrap();
        assert_eq!(decode(b.clone()), Some(b"older format".to_vec()));
        assert_eq!(b[0], 0x08, "etcd's format now");
    }
}

//! Snapshot files: `%016x-%016x.snap` (term-index), each `crc32c: u32 LE | data`.

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
        let mut bytes = Vec::with_capacity(4 + data.len());
        bytes.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        bytes.extend_from_slice(data);
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
            let ok = bytes.len() >= 4 && {
                let crc = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                crc32c::crc32c(&bytes[4..]) == crc
            };
            if ok {
                return Ok(Some(SnapFile { term, index, data: bytes[4..].to_vec() }));
            }
            tracing::warn!(file = %path.display(), "snap: checksum mismatch; renaming to .broken");
            let broken = self.dir.join(format!("{name}.broken"));
            fs::rename(&path, &broken).map_err(io_err(&broken))?;
        }
        Ok(None)
    }
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
}

//! keel-wal: the write-ahead log and the snapshot files of one member.
//!
//! Owns the files in `<data-dir>/member/wal/` (`%016x-%016x.wal`, sequence-index) and
//! `<data-dir>/member/snap/` (`%016x-%016x.snap`, term-index). The WAL is in etcd's format, so
//! that etcd's tools and test harnesses read a Keel member's WAL and an etcd member can be started
//! on it: frames of an 8-byte length field and a `walpb.Record{type, crc, data}`, padded to 8
//! bytes (`frame`); a CRC-32C chained over the data of every record; segments preallocated to
//! 64 MB, each beginning with a crc record carrying the chain on, the metadata record and (the
//! first segment) an empty snapshot record or (later ones) the latest hard state. What the
//! records' data mean belongs to the caller (keel-raft). `legacy` reads the format older Keel
//! versions wrote. Calls nothing else in Keel.
//!
//! Recovery rules:
//! - In the last segment, a record that runs past the end of the file, or that does not decode
//!   or fails its checksum while a zeroed sector or nothing but zeros follows it, is a torn
//!   write: it and everything after it are cut off, with a warning, unless an intact record lies
//!   after it.
//! - Any other damage, anywhere (a checksum failure, a broken chain between segments, metadata
//!   that differs between segments), is corruption: opening fails with an error naming the file
//!   and the offset.

mod frame;
pub mod legacy;
mod snap;
mod wal;

pub use snap::{SnapFile, Snapshotter};
pub use wal::{
    Record, RecordAt, Wal, WalOptions, EMPTY_SNAPSHOT, RECORD_CRC, RECORD_ENTRY, RECORD_METADATA, RECORD_SNAPSHOT, RECORD_STATE,
};

use std::path::PathBuf;

/// Told how long each WAL fsync took (the server's metrics); set once at start.
pub static FSYNC_OBSERVER: std::sync::OnceLock<fn(std::time::Duration)> = std::sync::OnceLock::new();

/// Told how long each snapshot file save took in all and in its fsync; set once at start.
pub static SNAP_OBSERVER: std::sync::OnceLock<fn(std::time::Duration, std::time::Duration)> = std::sync::OnceLock::new();

/// Told the bytes and the time of each WAL write (before its fsync); set once at start.
pub static WRITE_OBSERVER: std::sync::OnceLock<fn(usize, std::time::Duration)> = std::sync::OnceLock::new();

/// Errors of the WAL and snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wal: io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wal: corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("wal: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Creates `dir` and any missing parents durably: each new directory is fsynced, and so is the
/// directory its entry went into (a new directory is not there after a power cut otherwise).
pub fn create_dir_all_durable(dir: &std::path::Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.as_os_str().is_empty() && !cur.exists() {
        missing.push(cur);
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(d)(e)),
        }
        sync_dir(d)?;
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        sync_dir(parent)?;
    }
    Ok(())
}

/// Fsyncs a directory so that file creations, renames and removals in it are durable.
pub fn sync_dir(dir: &std::path::Path) -> Result<()> {
    // Negative control of the power-loss tests (failpoints builds only): skip the fsync.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("wal::skip_dir_sync", |_| Ok(()));
    let f = std::fs::File::open(dir).map_err(io_err(dir))?;
    f.sync_all().map_err(io_err(dir))
}

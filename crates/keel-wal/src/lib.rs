//! keel-wal: the write-ahead log and the snapshot files of one member.
//!
//! Owns the files in `<data-dir>/member/wal/` (`%016x-%016x.wal`, sequence-index) and
//! `<data-dir>/member/snap/` (`%016x-%016x.snap`, term-index). Records are opaque bytes with a
//! one-byte type; what they mean belongs to the caller (keel-raft). Calls nothing else in Keel.
//!
//! Record layout, every record 8-byte aligned:
//! `len: u32 LE | crc32c(type|payload): u32 LE | type: u8 | payload | zero padding`.
//! `len` counts type and payload. Segments are preallocated with zeros, so a zero `len` marks the
//! end of the written part.
//!
//! Recovery rules:
//! - In the last segment, a record that runs past the end of the file, or whose checksum fails
//!   while a zeroed sector or nothing but zeros follows it, is a torn write: it and everything
//!   after it are cut off, with a warning.
//! - Any other checksum failure, anywhere, is corruption: opening fails with an error naming the
//!   file and the offset.

mod snap;
mod wal;

pub use snap::{SnapFile, Snapshotter};
pub use wal::{Record, Wal, WalOptions, RECORD_ENTRY, RECORD_METADATA, RECORD_SNAPSHOT, RECORD_STATE};

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

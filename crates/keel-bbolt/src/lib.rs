//! keel-bbolt: bbolt database files, the format of etcd's backend (`member/snap/db`) and of its
//! snapshots. Owns the page layout only; knows nothing of etcd's schema (keel's `etcdfmt`
//! module maps buckets to Keel's state).
//!
//! - [`page`]: the on-disk layout of bbolt 1.3 (pages, meta, branch and leaf elements,
//!   inline buckets, overflow, freelist), little-endian as every amd64/arm64 build writes it.
//! - [`read`]: a checked reader: every page id, element and length is validated against the
//!   file before use; corruption is an [`Error`] naming the file and offset, never a panic.
//!   Reads pages with positional reads (no mmap), so a file changed underneath cannot fault.
//! - [`write`]: a one-pass writer of a fresh, compact file from sorted buckets (what a snapshot
//!   is): leaves filled in key order, branch levels above them, an empty freelist, two metas.
//!   The file is a valid bbolt database that Go's bbolt (etcd, etcdctl, etcdutl) opens and
//!   writes to.
//!
//! Calls nothing but std.

pub mod page;
pub mod read;
pub mod write;

pub use read::Db;
pub use write::Writer;

/// A bad or unreadable bbolt file: which file, where, what.
#[derive(Debug, thiserror::Error)]
#[error("{file}: offset {offset}: {msg}")]
pub struct Error {
    pub file: String,
    pub offset: u64,
    pub msg: String,
}

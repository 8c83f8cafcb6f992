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
//! Why not the `bbolt-rs` crate (a port of bbolt 1.3.10): it maps the file into memory (a file
//! damaged or changed underneath faults the process instead of returning an error), has ~95
//! `unsafe` blocks on that path, and pulls in a CLI's dependencies (clap, fake, bumpalo, ...)
//! for a library use; Keel needs only to read every key of a file once, checked, and to write a
//! fresh compact file, which is this crate's few hundred lines. Tested on real files of etcd
//! 3.4.23, 3.5.21, 3.6.16 and 3.7.3 (`tests/etcd_files.rs`) and by Go's bbolt itself (etcdctl and
//! etcdutl restore and etcd start on files written here: `crates/keel/tests/migrate.rs`).
//!
//! Calls nothing but std.

pub mod page;
pub mod read;
pub mod write;

pub use read::Db;
pub use write::Writer;

/// True when `head` (a file's first bytes, at least 20) starts with a bbolt meta page.
pub fn is_bbolt(head: &[u8]) -> bool {
    page::u32_at(head, page::HEADER) == Some(page::MAGIC)
}

/// A bad or unreadable bbolt file: which file, where, what.
#[derive(Debug, thiserror::Error)]
#[error("{file}: offset {offset}: {msg}")]
pub struct Error {
    pub file: String,
    pub offset: u64,
    pub msg: String,
}

//! keel-powerfs: a FUSE filesystem that loses what was not made durable when the power goes,
//! and fails operations on command: the disk under Keel's power-loss and disk-fault tests.
//!
//! Writes, truncates, creates, renames and unlinks are visible at once; a file's content and
//! length become durable only on its fsync/fdatasync, a directory's entries only on the
//! directory's fsync. A power cut (the `cut` command) drops everything else, as LazyFS does.
//! Faults: EIO on write, fsync or read, ENOSPC past a capacity, at chosen or random points; a
//! failed fsync loses the pages it was to write, as Linux does.
//!
//! - [`content`]: one file's bytes, visible and durable (pure).
//! - [`tree`]: inodes and directories, visible and durable entries, the power cut (pure).
//! - [`faults`]: which operations fail (pure policy).
//! - [`fs`]: the FUSE adapter (fuser) over the tree and the faults.
//! - [`control`]: the line commands of the harness.

pub mod content;
pub mod control;
pub mod faults;
pub mod fs;
pub mod tree;

//! What fails in the MVCC store: etcd's errors that depend on the store's state ([`KvError`]),
//! and the backend's ([`BackendError`]). Calls nothing.

use std::path::PathBuf;

/// A backend failure: the disk or the redb file. Not recoverable by the caller.
#[derive(Debug, thiserror::Error)]
#[error("backend {path}: {msg}")]
pub struct BackendError {
    pub path: PathBuf,
    pub msg: String,
}

/// Failures that depend on the store's state. Messages are etcd's (without "etcdserver: ").
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("key not found")]
    KeyNotFound,
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("mvcc: corrupt store: {0}")]
    Corrupt(String),
}

//! What fails in the MVCC store ([`KvError`]): etcd's errors that depend on the store's state,
//! and the backend's. Calls nothing but the backend's error type.

use crate::backend::BackendError;

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
    Backend(BackendError),
    #[error("mvcc: corrupt store: {0}")]
    Corrupt(String),
}

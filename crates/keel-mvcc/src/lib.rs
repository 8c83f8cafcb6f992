//! keel-mvcc: the multi-version key-value store of one member.
//!
//! Owns `<data-dir>/member/snap/db` (a redb file) and the in-memory key index. Every change gets a
//! revision (main, sub); keys keep create_revision, mod_revision, version and lease; a delete writes
//! a tombstone that ends the key's generation; reads at any revision that is not compacted.
//!
//! - [`index`]: the in-memory ordered index, key -> revision history.
//! - [`layered`]: the index as layers of changed histories over committed ones read on demand.
//! - [`keyindex`]: the store's index, all in memory ([`index`]) or kept in the backend
//!   ([`layered`] over a table of histories, merged into it in parts that ride the batches).
//! - [`backend`]: the redb tables, committed in batches together with the consistent index.
//! - `pace`: a background walk's disk reads kept to a rate (the WALs share the disk).
//! - `parts`: records longer than a page, stored as page-sized parts (the backend's layout).
//! - [`store`]: ties index and backend together: versioned reads, atomic write transactions,
//!   compaction, restore on open.
//! - [`shared`]: the store shared by one writer and many readers; commits and big reads that do
//!   not hold its lock.
//! - [`kv`]: etcd's request semantics (Range, Put, DeleteRange, Txn, Compact) on top of the store.
//! - [`watch`]: the watch hub (etcd's watchable store): synced watchers fed by the apply path,
//!   catch-up of the others from the store.
//!
//! Called by the server's apply path (writes), read path (reads) and watch service. Calls only
//! keel-proto, redb and tokio (the watch hub's channels and catch-up tasks).

pub mod backend;
pub mod error;
pub mod index;
pub mod keyindex;
pub mod kv;
pub mod layered;
mod pace;
mod parts;
pub mod revision;
pub mod shared;
pub mod store;
pub mod watch;

pub use keyindex::IndexMode;
pub use kv::{KvError, TxnLimits};
pub use revision::Revision;
pub use shared::SharedStore;
pub use store::{Store, TxnOutcome};

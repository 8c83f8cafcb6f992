//! migrate: etcd's files in and out. An etcd backend (bbolt, etcd's schema) becomes a Keel
//! backend and back ([`backend`]); etcd's WAL and `.snap` files are read ([`wal`], [`snap`]) so
//! that a Keel member can start on an etcd data dir ([`datadir`]), keeping member and cluster
//! IDs, every revision, leases, auth and alarms.
//!
//! Calls keel-bbolt, keel-mvcc (to build and read a backend), keel-raft's disk layer (to write a
//! Keel WAL and snapshot), and the record formats of membership, lease, auth and alarm.

pub mod backend;
pub mod datadir;
pub mod request;
pub mod snap;
pub mod wal;

/// True when the file at `path` starts with a bbolt meta page (etcd's backend format).
pub fn is_bbolt(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 20];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)) {
        Ok(()) => keel_bbolt::is_bbolt(&head),
        Err(_) => false,
    }
}

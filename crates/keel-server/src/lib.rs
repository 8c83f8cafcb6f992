//! keel-server: one member's core, below the client API (etcd's `server/etcdserver`).
//!
//! Owns the state machine raft drives and what feeds it: proposals and their waiters, the
//! linearizable read barrier, the quota, membership, alarms, auto compaction, the leader's lease
//! duties, the raft transport between members, and v3 discovery. Everything it reports is a
//! domain [`error::Error`]; the gRPC form of those errors is keel-api's.
//!
//! May call keel-raft, keel-mvcc (store and watch hub), keel-lease, keel-auth, keel-config and
//! keel-metrics; never keel-api (the API calls the server, not the reverse).
//!
//! Modules, in the order data flows through them:
//! - [`server`]: proposals, linearizable reads, quota, response headers (what handlers share).
//! - [`entry`]: what a raft entry carries: etcd's `InternalRaftRequest`.
//! - [`peer`]: the peer dialer (plain or TLS) and the snapshot size bound.
//! - [`apply`]: the state machine keel-raft's apply stage drives (MVCC writes, leases, auth,
//!   alarms, membership), and the callers waiting for their entries.
//! - [`membership`]: member and cluster IDs, the member list.
//! - [`alarm`]: NOSPACE and CORRUPT alarms.
//! - [`lease_duties`]: the leader's renewals, TTL queries, expiry and checkpoints.
//! - [`compactor`]: auto compaction.
//! - [`discovery`]: etcd's v3 discovery (the initial cluster learned from another cluster).
//! - [`rafthttp`]: etcd's peer protocol (raft streams, pipeline, snapshots, probing, `/leases`),
//!   the raft transport of Keel-only and mixed clusters alike, on a runtime of its own.
//! - [`cluster_version`]: the leader's decision of the cluster version.
//! - [`background`]: whole-backend copies (snapshots, defragmentation) on niced threads.
//! - [`error`]: the server's domain errors.

pub mod alarm;
pub mod apply;
pub mod background;
pub mod cluster_version;
pub mod committer;
pub mod compactor;
pub mod corruption;
pub mod discovery;
pub mod entry;
pub mod error;
pub mod kv_hash;
pub mod lease_duties;
pub mod membership;
pub mod peer;
pub mod rafthttp;
pub mod server;
pub mod v2store;

pub use error::Error;

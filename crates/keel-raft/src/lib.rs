//! keel-raft: the raft node of one member, on the `raft` crate (tikv/raft-rs, etcd's design).
//!
//! Owns the `RawNode`, the tick timer and the Ready loop: persist entries and hard state to the
//! WAL and fsync, then hand committed entries to the apply stage, which applies them to the
//! state machine on a thread of its own; then advance. Also owns snapshots (taken by the apply
//! stage every `snapshot_count` applied entries, saved by the raft thread), WAL release, and the
//! in-memory log's compaction to the last `catchup_entries` every 100 applied entries.
//!
//! - [`disk`]: what a member has on disk (WAL + snapshot files) and how it is read back.
//! - [`node`]: the raft thread and the handle the server uses to propose and to read.
//! - [`inbox`]: how the raft thread sleeps: its inbox and the connections its transport reads
//!   on it, in one poll.
//! - [`apply`]: the apply stage: committed entries in order, reads answered once applied,
//!   snapshots of the state machine.
//! - [`storage`]: the in-memory raft log raft reads (entries since the last compaction).
//! - [`hops`]: how long each hop of a write and of a read takes (observed for metrics).
//! - [`logger`]: raft-rs logs (slog) forwarded to `tracing`.
//! - [`wire`]: the decoder of raft's messages from peers and disk (prost, not protobuf 2).
//!
//! Calls keel-wal for durability and the [`StateMachine`] it is given for applying; knows nothing
//! of keys, revisions or gRPC.

pub mod apply;
pub mod disk;
pub mod hops;
pub mod inbox;
pub mod logger;
pub mod machine;
pub mod node;
pub mod status;
pub mod storage;
pub mod wire;

pub use disk::{Disk, Identity};
pub use node::{start, NoTransport, NodeConfig, NodeHandle, NodeStatus, ProposeError, Proposed, StateMachine, Transport};
pub use protobuf::Message as ProtoMessage;
pub use raft::eraftpb;

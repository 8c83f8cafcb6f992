//! etcd's peer protocol (`rafthttp`), the only protocol Keel members speak with each other and
//! with etcd members: raft streams opened by the receiver (`/raft/stream/msgapp/<id>`,
//! `/raft/stream/message/<id>`), the pipeline (`POST /raft`), snapshots (`POST /raft/snapshot`;
//! between Keel members `POST /raft/keel/snapshot`), probing, and the lease requests followers forward to the leader (`/leases`).
//!
//! - [`transport`]: the raft transport: links to peers, where each message goes;
//! - [`stream`], [`writer`] and [`reader`] (streams the raft thread writes and reads itself), [`pipeline`], [`snapshot`], [`probe`]: the ways messages travel;
//! - [`records`]: the backend as records, Keel's own snapshot body between Keel members;
//! - [`handler`]: what this member answers on its peer URLs for all of them;
//! - [`codec`]: the streams' byte framing; [`handshake`]: a stream request's headers and rules;
//! - [`client`]: HTTP/1.1 requests to peers (kept connections, one-shot requests, `/members`).
//!
//! Calls keel-raft's node and wire decoders, the member list, keel-config's version, the peer
//! dialer and keel-metrics only.

pub mod client;
pub mod codec;
pub mod handler;
pub mod handshake;
pub mod pipeline;
pub mod probe;
pub mod reader;
pub mod records;
pub mod snapshot;
pub mod stream;
#[cfg(test)]
mod testing;
pub mod transport;
pub mod writer;

pub use handler::{Forwarded, Handler, NotPrimary};
pub use snapshot::BackendFiles;
pub use transport::{Setup, Transport};

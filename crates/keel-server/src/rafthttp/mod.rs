//! etcd's peer protocol (`rafthttp`), which Keel members are to speak with each other and with
//! etcd members: raft streams opened by the receiver (`/raft/stream/msgappv2/<id>`,
//! `/raft/stream/message/<id>`), the pipeline (`POST /raft`), snapshots (`POST /raft/snapshot`).
//!
//! Built so far (nothing uses them yet; the gRPC peer service still carries raft):
//! - [`codec`]: the streams' byte framing (both directions, bounded);
//! - [`handshake`]: the stream request's headers and etcd's decision on it;
//! - [`client`]: one-shot HTTP/1.1 requests to a peer (`/members`, `/version`).
//!
//! Calls keel-raft's wire decoders, keel-config's version and the peer dialer only.

pub mod client;
pub mod codec;
pub mod handshake;

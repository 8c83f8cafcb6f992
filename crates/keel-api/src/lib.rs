//! keel-api: the client-facing side of a member (etcd's `api/v3rpc` and its HTTP endpoints).
//!
//! Owns the gRPC services and their request checks, the mapping of the server's domain errors
//! to etcd's gRPC codes and messages ([`errors`]), the `/v3` JSON gateway, the HTTP endpoints,
//! the listeners with their TLS and connection bounds, the HTTP/2 `:authority` shim, the gRPC
//! call metrics middleware, and the answers to what followers forward to the leader.
//!
//! May call keel-server (the only way into raft and the store's write side), keel-mvcc's read
//! side and watch hub, keel-auth, keel-lease, keel-config, keel-migrate (snapshots in etcd's
//! format) and keel-metrics.
//!
//! Modules:
//! - [`api`]: the gRPC services of etcd's v3 API.
//! - [`errors`]: etcd's gRPC errors, and the server's errors in that form.
//! - [`gateway`]: the `/v3` JSON gateway; [`http`]: `/health`, `/metrics`, `/version`, ...
//! - [`peer_http`]: etcd's HTTP endpoints on the peer URLs (`/members`, promotion, `/version`).
//! - [`serve`], [`tls`], [`h2fix`]: listeners (TCP/unix, plain/TLS), connection bounds, HTTP/2
//!   settings, the `:authority` fix for etcdctl 3.4.
//! - [`grpc_metrics`]: the gRPC call metrics middleware (the families are keel-metrics').
//! - [`forwarded`]: what followers forward to the leader over the peer service, answered here.

pub mod api;
pub mod errors;
pub mod forwarded;
pub mod gateway;
pub mod grpc_metrics;
pub mod h2fix;
pub mod http;
pub mod peer_http;
pub mod serve;
pub mod snapshot_files;
pub mod tls;

//! The gRPC services of etcd's v3 API. Each handler checks the request's shape (etcd's
//! `v3rpc/key.go` rules), then hands it to the [`Server`](crate::server::Server).
//!
//! Calls the server core only; never raft or the store's write side directly.

pub mod auth;
pub mod cluster;
pub mod concurrency;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod validate;
pub mod watch;

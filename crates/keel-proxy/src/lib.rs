//! keel-proxy: etcd's proxies (`server/proxy`): the L4 gateway (`keel gateway start`, [`proxy`])
//! and the gRPC proxy (`keel grpc-proxy start`, [`grpc_proxy`]).
//!
//! Owns their flags and connections. May call keel-config (durations, URL lists), keel-api's
//! listeners and TLS settings, and keel-server's peer dialer; never a member's state.

pub mod grpc_proxy;
pub mod proxy;

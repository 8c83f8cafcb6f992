//! The gRPC services of etcd's v3 API. Each handler checks the request's shape (etcd's
//! `v3rpc/key.go` rules), then hands it to the [`Server`](keel_server::server::Server).
//!
//! Calls the server core only; never raft or the store's write side directly.

pub mod auth;
pub mod cluster;
pub mod concurrency;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod range_stream;
pub mod validate;
pub mod watch;

use keel_auth::{AuthError, AuthInfo};
use keel_server::server::Server;
use tonic::Status;

/// Who sent a client request: the user of its token (`token` metadata, or `authorization` as
/// etcd's gateway sends it), else the verified client certificate's common name (when
/// `--client-cert-auth` is on), else nobody.
pub fn auth_info(s: &Server, md: &tonic::metadata::MetadataMap, ext: &http::Extensions) -> Result<AuthInfo, Status> {
    let token = match md.get("token").or_else(|| md.get("authorization")) {
        Some(t) => Some(t.to_str().map_err(|_| crate::errors::auth(AuthError::InvalidToken))?),
        None => None,
    };
    let cn = ext.get::<crate::serve::PeerCommonName>().map(|c| c.0.as_str());
    s.auth_info(token, cn).map_err(crate::errors::status)
}

/// [`auth_info`] of a tonic request.
pub fn caller<T>(s: &Server, req: &tonic::Request<T>) -> Result<AuthInfo, Status> {
    auth_info(s, req.metadata(), req.extensions())
}

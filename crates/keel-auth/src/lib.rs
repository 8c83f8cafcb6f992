//! Authentication and authorization: users, roles, key-range permissions, tokens.
//!
//! Owns the auth store (persisted as auxiliary records of the MVCC backend, changed only by applied
//! raft entries) and the token table. The server asks it who a caller is ([`AuthInfo`]) and the
//! applier asks it whether that caller may do what a request does. Calls keel-mvcc's aux records
//! only.

pub mod perm;
pub mod store;
pub mod token;

pub use store::{AuthStore, Perm};
pub use token::Tokens;

/// Who a request comes from: a user name and the auth revision their credentials were checked at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

/// etcd's auth errors (`auth/store.go`); [`keel_api::errors::auth`] gives their gRPC form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExist,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExist,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("revision of auth store is old")]
    OldRevision,
    #[error("invalid auth token")]
    InvalidToken,
    #[error("invalid auth management")]
    InvalidMgmt,
    #[error("permission not given")]
    PermissionNotGiven,
}

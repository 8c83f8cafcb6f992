//! The server's domain errors: why a proposal, a read barrier or an applied request failed, in
//! the server's own terms. The API layer (`errors::status`) gives each its etcd gRPC code and
//! message; nothing below the API speaks gRPC to a client.
//!
//! Owns the [`Error`] type only; wraps the errors of the stores it calls (keel-mvcc, the lessor,
//! the auth store, keel-raft).

use keel_auth::AuthError;
use keel_lease::LeaseError;
use keel_mvcc::KvError;
use keel_raft::ProposeError;

/// A failure the server reports to whoever asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The member stopped before the request was answered.
    #[error("server stopped")]
    Stopped,
    /// No answer within `--request-timeout` (or the read barrier's).
    #[error("request timed out")]
    Timeout,
    /// The entry was overwritten by another leader's (etcd's ErrTimeoutDueToLeaderFail).
    #[error("request timed out, possibly due to previous leader failure")]
    LeaderChanged,
    /// Too many bytes of proposals in flight (`--max-pending-proposal-bytes`).
    #[error("too many requests")]
    TooManyRequests,
    /// The encoded request is over `--max-request-bytes`.
    #[error("request is too large")]
    RequestTooLarge,
    /// The NOSPACE alarm is raised, or this write would exceed the quota.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// The CORRUPT alarm is raised: no writes.
    #[error("corrupt cluster")]
    Corrupt,
    /// Raft refused a committed membership change; nothing changed.
    #[error("the membership change was refused by raft")]
    ConfChangeRefused,
    /// This member is a learner and the request needs a voter.
    #[error("rpc not supported for learner")]
    Learner,
    /// The request must be served by the leader, and this member is not it.
    #[error("not leader")]
    NotLeader,
    /// No leader is known to forward to.
    #[error("no leader")]
    NoLeader,
    #[error("member not found")]
    MemberNotFound,
    /// Promotion of a member that is not a learner.
    #[error("can only promote a learner member")]
    NotLearner,
    /// Promotion of a learner less than 90% caught up.
    #[error("can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// The leader answered a forwarded request with this gRPC status; passed on as it came.
    #[error("{}", .0.message())]
    Forwarded(tonic::Status),
    /// A state the server does not expect (a bug): reported, never a panic.
    #[error("{0}")]
    Internal(String),
}

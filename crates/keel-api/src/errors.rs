//! etcd's gRPC errors: the same codes and messages (`api/v3rpc/rpctypes`).

use keel_mvcc::KvError;
use keel_raft::ProposeError;
use keel_server::error::Error;
use tonic::{Code, Status};

fn st(code: Code, msg: &str) -> Status {
    Status::new(code, format!("etcdserver: {msg}"))
}

pub fn empty_key() -> Status {
    st(Code::InvalidArgument, "key is not provided")
}
pub fn value_provided() -> Status {
    st(Code::InvalidArgument, "value is provided")
}
pub fn lease_provided() -> Status {
    st(Code::InvalidArgument, "lease is provided")
}
pub fn too_many_ops() -> Status {
    st(Code::InvalidArgument, "too many operations in txn request")
}
pub fn duplicate_key() -> Status {
    st(Code::InvalidArgument, "duplicate key given in txn request")
}
pub fn invalid_sort_option() -> Status {
    st(Code::InvalidArgument, "invalid sort option")
}
/// etcd's ErrTooManyRequests: the member is overloaded; the client backs off and retries.
pub fn too_many_requests() -> Status {
    st(Code::ResourceExhausted, "too many requests")
}
pub fn request_too_large() -> Status {
    st(Code::InvalidArgument, "request is too large")
}
pub fn timeout() -> Status {
    st(Code::Unavailable, "request timed out")
}
/// A proposal lost to a leader change (etcd's ErrTimeoutDueToLeaderFail).
pub fn timeout_leader_fail() -> Status {
    st(Code::Unavailable, "request timed out, possibly due to previous leader failure")
}
pub fn stopped() -> Status {
    st(Code::Unavailable, "server stopped")
}
pub fn no_leader() -> Status {
    st(Code::Unavailable, "no leader")
}

pub fn learner() -> Status {
    st(Code::FailedPrecondition, "rpc not supported for learner")
}
pub fn member_not_found() -> Status {
    st(Code::NotFound, "member not found")
}
pub fn member_exists() -> Status {
    st(Code::FailedPrecondition, "member ID already exist")
}
pub fn peer_url_exists() -> Status {
    st(Code::FailedPrecondition, "Peer URLs already exists")
}
pub fn invalid_member_urls() -> Status {
    st(Code::InvalidArgument, "given member URLs are invalid")
}
/// A committed membership change raft refused (it would leave no voter, say): nothing changed.
pub fn conf_change_refused() -> Status {
    Status::failed_precondition("etcdserver: the membership change was refused by raft")
}

pub fn not_enough_started() -> Status {
    st(Code::FailedPrecondition, "re-configuration failed due to not enough started members")
}
pub fn unhealthy() -> Status {
    st(Code::Unavailable, "unhealthy cluster")
}
pub fn learner_not_ready() -> Status {
    st(Code::FailedPrecondition, "can only promote a learner member which is in sync with leader")
}
pub fn not_learner() -> Status {
    st(Code::FailedPrecondition, "can only promote a learner member")
}
pub fn too_many_learners() -> Status {
    st(Code::FailedPrecondition, "too many learner members in cluster")
}
pub fn not_leader() -> Status {
    st(Code::FailedPrecondition, "not leader")
}
pub fn bad_transferee() -> Status {
    st(Code::FailedPrecondition, "bad leader transferee")
}

pub fn lease(e: keel_lease::LeaseError) -> Status {
    match e {
        keel_lease::LeaseError::NotFound => st(Code::NotFound, "requested lease not found"),
        keel_lease::LeaseError::Exists => st(Code::FailedPrecondition, "lease already exists"),
    }
}
pub fn lease_ttl_too_large() -> Status {
    st(Code::OutOfRange, "too large lease TTL")
}

pub fn propose(e: ProposeError) -> Status {
    match e {
        ProposeError::NoLeader => no_leader(),
        ProposeError::Stopped => stopped(),
        ProposeError::Busy => too_many_requests(),
        ProposeError::Timeout => timeout(),
    }
}

pub fn kv(e: KvError) -> Status {
    match e {
        KvError::Compacted => st(Code::OutOfRange, "mvcc: required revision has been compacted"),
        KvError::FutureRev => st(Code::OutOfRange, "mvcc: required revision is a future revision"),
        KvError::LeaseNotFound => st(Code::NotFound, "requested lease not found"),
        KvError::KeyNotFound => st(Code::InvalidArgument, "key not found"),
        KvError::Backend(e) => Status::internal(format!("etcdserver: {e}")),
        KvError::Corrupt(e) => Status::data_loss(format!("etcdserver: corrupt cluster: {e}")),
    }
}

/// A server error in etcd's gRPC form (code and message, as `api/v3rpc/rpctypes` gives them).
pub fn status(e: Error) -> Status {
    match e {
        Error::Kv(e) => kv(e),
        Error::Lease(e) => lease(e),
        Error::Auth(e) => auth(e),
        Error::Propose(e) => propose(e),
        Error::Stopped => stopped(),
        Error::Timeout => timeout(),
        Error::LeaderChanged => timeout_leader_fail(),
        Error::TooManyRequests => too_many_requests(),
        Error::RequestTooLarge => request_too_large(),
        Error::NoSpace => no_space(),
        Error::Corrupt => corrupt(),
        Error::ConfChangeRefused => conf_change_refused(),
        Error::Learner => learner(),
        Error::NotLeader => not_leader(),
        Error::NoLeader => no_leader(),
        Error::MemberNotFound => member_not_found(),
        Error::NotLearner => not_learner(),
        Error::LearnerNotReady => learner_not_ready(),
        Error::Forwarded(s) => s,
        Error::Internal(m) => Status::internal(format!("etcdserver: {m}")),
    }
}

/// gRPC-Go's answer to a message over the size limit (what etcd clients see), from tonic's
/// ("Error, decoded message length too large: found N bytes, the limit is: M bytes", OutOfRange).
pub fn oversized_message(tonic_message: &str) -> Option<(Code, String)> {
    let rest = tonic_message.strip_prefix("Error, decoded message length too large: found ")?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some((Code::ResourceExhausted, format!("grpc: received message larger than max ({found} vs. {limit})")))
}

/// A gRPC middleware: rewrites tonic's errors that gRPC-Go words differently into gRPC-Go's
/// code and message (today: an oversized request).
pub async fn grpc_compat(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let msg = h.get("grpc-message").and_then(|v| v.to_str().ok()).map(percent_decode);
    if let Some((code, text)) = msg.as_deref().and_then(oversized_message) {
        if let (Ok(c), Ok(m)) = ((code as i32).to_string().parse(), text.parse()) {
            h.insert("grpc-status", c);
            h.insert("grpc-message", m);
        }
    }
    resp
}

/// gRPC's percent-encoding of grpc-message (only what tonic escapes: %XX).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An auth store error, with etcd's gRPC code.
pub fn auth(e: keel_auth::AuthError) -> Status {
    use keel_auth::AuthError::*;
    let code = match e {
        UserEmpty | RoleEmpty | AuthFailed | InvalidMgmt | OldRevision | PermissionNotGiven => Code::InvalidArgument,
        PermissionDenied => Code::PermissionDenied,
        InvalidToken => Code::Unauthenticated,
        _ => Code::FailedPrecondition,
    };
    st(code, &e.to_string())
}

pub fn no_space() -> Status {
    st(Code::ResourceExhausted, "mvcc: database space exceeded")
}
pub fn corrupt() -> Status {
    st(Code::DataLoss, "corrupt cluster")
}

pub fn wrong_downgrade_version_format() -> Status {
    Status::invalid_argument("etcdserver: wrong downgrade target version format")
}

pub fn invalid_downgrade_target_version() -> Status {
    Status::invalid_argument("etcdserver: invalid downgrade target version")
}

pub fn cluster_version_unavailable() -> Status {
    Status::failed_precondition("etcdserver: cluster version not found during downgrade")
}

pub fn downgrade_in_process() -> Status {
    Status::failed_precondition("etcdserver: cluster has a downgrade job in progress")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_messages_read_as_grpc_go_words_them() {
        let t = percent_decode("Error, decoded message length too large: found 4194315 bytes, the limit is: 2097152 bytes");
        assert_eq!(
            oversized_message(&t),
            Some((Code::ResourceExhausted, "grpc: received message larger than max (4194315 vs. 2097152)".into()))
        );
        assert_eq!(oversized_message("etcdserver: request is too large"), None);
        assert_eq!(percent_decode("a%20b%"), "a b%");
    }

    #[test]
    fn server_errors_carry_etcds_codes_and_messages() {
        let cases = [
            (Error::LeaderChanged, Code::Unavailable, "etcdserver: request timed out, possibly due to previous leader failure"),
            (Error::Stopped, Code::Unavailable, "etcdserver: server stopped"),
            (Error::NoSpace, Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
            (Error::Kv(KvError::Compacted), Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
            (Error::Lease(keel_lease::LeaseError::NotFound), Code::NotFound, "etcdserver: requested lease not found"),
            (Error::Auth(keel_auth::AuthError::PermissionDenied), Code::PermissionDenied, "etcdserver: permission denied"),
            (Error::Propose(ProposeError::Busy), Code::ResourceExhausted, "etcdserver: too many requests"),
            (Error::Learner, Code::FailedPrecondition, "etcdserver: rpc not supported for learner"),
            (Error::Forwarded(Status::unavailable("etcdserver: not leader")), Code::Unavailable, "etcdserver: not leader"),
        ];
        for (e, code, msg) in cases {
            let s = status(e);
            assert_eq!((s.code(), s.message()), (code, msg));
        }
    }
}

//! Where the time of a write and of a linearizable read goes, hop by hop, as this member sees
//! it: observed by the raft thread and the apply stage, exported by the server as histograms
//! (`keel_raft_hop_duration_seconds{hop=...}`).
//!
//! Owns nothing but the observer hook; calls nothing.

use std::sync::OnceLock;
use std::time::Duration;

/// One hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hop {
    /// Leader: from a proposal entering the raft thread's inbox to its entry durable in this
    /// member's WAL (append + fsync).
    Append,
    /// Leader: from a proposal entering the inbox to its entry committed (durable on a quorum)
    /// and handed to the apply stage.
    Commit,
    /// Follower: from an append message stepped into raft to its acknowledgement sent (after the
    /// fsync).
    FollowerAppend,
    /// From committed entries handed over to the apply stage starting on them.
    ApplyQueue,
    /// Applying one entry.
    Apply,
    /// From a ReadIndex round started to raft confirming its index.
    ReadConfirm,
    /// From a read's index confirmed to its answer (the apply stage reached the index).
    ReadApply,
}

impl Hop {
    pub const ALL: [Hop; 7] =
        [Hop::Append, Hop::Commit, Hop::FollowerAppend, Hop::ApplyQueue, Hop::Apply, Hop::ReadConfirm, Hop::ReadApply];

    /// The `hop` label.
    pub fn name(self) -> &'static str {
        match self {
            Hop::Append => "append",
            Hop::Commit => "commit",
            Hop::FollowerAppend => "follower_append",
            Hop::ApplyQueue => "apply_queue",
            Hop::Apply => "apply",
            Hop::ReadConfirm => "read_confirm",
            Hop::ReadApply => "read_apply",
        }
    }
}

/// Told every hop's duration; set once at start (the server's metrics).
pub static OBSERVER: OnceLock<fn(Hop, Duration)> = OnceLock::new();

pub(crate) fn observe(h: Hop, d: Duration) {
    if let Some(f) = OBSERVER.get() {
        f(h, d);
    }
}

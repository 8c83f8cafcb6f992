//! A member's live raft status ([`NodeStatus`]): written by the node thread and the apply stage
//! only, read by anyone without talking to them. Calls nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Live status, readable without talking to the node thread.
#[derive(Debug, Default)]
/// Written by the node thread and the apply stage only; everyone else reads.
pub struct NodeStatus {
    pub(crate) leader: AtomicU64,
    pub(crate) term: AtomicU64,
    pub(crate) commit: AtomicU64,
    pub(crate) applied: AtomicU64,
    pub(crate) last_index: AtomicU64,
    /// The first entry the log holds (older ones reach a follower by snapshot).
    pub(crate) log_first: AtomicU64,
    /// The first entry the log holds in memory (older ones are read back from the WAL).
    pub(crate) log_memory_first: AtomicU64,
    pub(crate) is_leader: AtomicBool,
    pub(crate) stopped: AtomicBool,
    /// Whom this member voted for in the current term (0: nobody).
    pub(crate) vote: AtomicU64,
    /// raft's role: 0 follower, 1 candidate, 2 leader, 3 pre-candidate.
    pub(crate) role: std::sync::atomic::AtomicU8,
    /// Times this member saw a new leader.
    pub(crate) leader_changes: AtomicU64,
    /// Ticks raft has taken, published once the messages they produced were handed to the
    /// transport (so a test driving ticks can wait for each one's heartbeats to be out).
    pub(crate) ticks: AtomicU64,
}

impl NodeStatus {
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Acquire)
    }
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
    pub fn commit(&self) -> u64 {
        self.commit.load(Ordering::Acquire)
    }
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }
    /// Ticks taken whose messages are handed to the transport.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Acquire)
    }
    /// The last index in this member's log.
    pub fn last_index(&self) -> u64 {
        self.last_index.load(Ordering::Acquire)
    }
    /// The first entry the log holds: a follower behind it is sent a snapshot.
    pub fn log_first_index(&self) -> u64 {
        self.log_first.load(Ordering::Acquire)
    }
    /// The first entry the log holds in memory: a follower behind it is sent entries read back
    /// from the WAL.
    pub fn log_memory_first_index(&self) -> u64 {
        self.log_memory_first.load(Ordering::Acquire)
    }
    /// True while this member leads.
    pub fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::Acquire)
    }
    /// True once the node stopped (on request or on a fatal error).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
    /// Times this member saw a new leader.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::Relaxed)
    }
    /// Whom this member voted for in the current term (0: nobody).
    pub fn vote(&self) -> u64 {
        self.vote.load(Ordering::Acquire)
    }
    /// raft's role as etcd names it: StateFollower, StateCandidate, StateLeader, StatePreCandidate.
    pub fn role(&self) -> &'static str {
        match self.role.load(Ordering::Acquire) {
            1 => "StateCandidate",
            2 => "StateLeader",
            3 => "StatePreCandidate",
            _ => "StateFollower",
        }
    }
}

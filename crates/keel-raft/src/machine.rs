//! What the raft crate asks of the state machine it replicates ([`StateMachine`]), and why a
//! proposal or read could not be started ([`ProposeError`]). Used by the node thread and the
//! apply stage alike; calls nothing.

use raft::eraftpb::{ConfState, Entry, Snapshot};

/// What the node needs from the application it replicates. Driven by the apply stage's thread
/// (every method but the first two and `removed_members`, which are asked once at start).
pub trait StateMachine: Send + 'static {
    /// Index of the last entry whose effects are already in the state machine (from its durable
    /// state at start). Entries at or below it are delivered again after a restart and must be
    /// skipped by [`StateMachine::apply`].
    fn applied_index(&self) -> u64;
    /// Term of the entry at [`StateMachine::applied_index`].
    fn applied_term(&self) -> u64;
    /// Applies a committed normal entry (its data may be empty: a new leader's no-op).
    fn apply(&mut self, entry: &Entry);
    /// Called after raft applied a committed configuration change; `cs` is the new configuration.
    fn apply_conf_change(&mut self, entry: &Entry, cs: &ConfState);
    /// A committed configuration change raft refused or that does not decode: the configuration
    /// stays as it was, and whoever proposed it must be answered now (not at its timeout).
    fn skip_conf_change(&mut self, _entry: &Entry) {}
    /// Called on every tick, after every batch of applies, and when [`StateMachine::maintain_in`]
    /// says (e.g. to commit backend batches, or run a compaction's next batch).
    fn maintain(&mut self);
    /// How soon the state machine wants [`StateMachine::maintain`] called again, if sooner than
    /// the next tick (a compaction paced by its sleep interval).
    fn maintain_in(&self) -> Option<std::time::Duration> {
        None
    }
    /// True when the state machine wants a snapshot at the current applied index now, whatever
    /// the snapshot count (etcd's ForceSnapshot after a cluster-version downgrade: a member
    /// restarted as the older release must not replay entries it refuses). Asked after every
    /// batch; answering true clears the wish.
    fn take_snapshot_wish(&mut self) -> bool {
        false
    }
    /// Makes everything applied so far durable; called before a snapshot lets WAL go.
    fn sync(&mut self) -> Result<(), String>;
    /// Index of the last applied entry whose effects are already durable, for a state machine
    /// that makes them durable by itself in the background (None: only [`StateMachine::sync`]
    /// does). With it, a snapshot that falls due waits for that index to reach it instead of
    /// syncing on the apply thread, where every apply behind it would wait too (a commit of a
    /// compaction's deletions: 350 ms at 5 GB).
    fn durable_index(&self) -> Option<u64> {
        None
    }
    /// The application data a snapshot at the current applied index carries.
    fn snapshot_data(&self) -> Vec<u8>;
    /// The configuration as of [`StateMachine::applied_index`], from the members the state
    /// machine holds (None when it holds none): what a restart continues from when the state
    /// machine is ahead of the log, as etcd takes it from its backend's members.
    fn conf_state(&self) -> Option<ConfState> {
        None
    }
    /// IDs of members removed from the cluster as of [`StateMachine::applied_index`] (asked once
    /// at start): a membership change adding one again is refused at apply, as etcd refuses it.
    fn removed_members(&self) -> Vec<u64> {
        Vec::new()
    }
    /// Replaces the whole state with a snapshot received from the leader; `backend` is the file
    /// holding the leader's backend that came with it.
    fn restore(&mut self, snap: &Snapshot, backend: Option<std::path::PathBuf>) -> Result<(), String>;
    /// The node is stopping: everything is applied and synced; answer whoever still waits.
    fn on_stop(&mut self) {}
}

/// Why a proposal or read could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader")]
    NoLeader,
    #[error("server stopped")]
    Stopped,
    #[error("too many requests")]
    Busy,
    #[error("request timed out")]
    Timeout,
}

//! What the clients did: every operation with its invocation and completion time and its
//! outcome (ok with the response, or unknown), and every watch response. Saved as JSON so a
//! failing run can be checked again (`keel-chaos check DIR`).
//!
//! Owns the data types only; [`crate::linearizability`] and [`crate::watchcheck`] read them.

use serde::{Deserialize, Serialize};

/// Nanoseconds since the start of the run. An operation whose outcome is unknown completes at
/// [`NEVER`]: it may take effect at any time after its invocation, or not at all.
pub type Time = u64;
pub const NEVER: Time = u64::MAX;

/// A key-value pair as a client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Kv {
    pub value: String,
    pub mod_rev: i64,
    pub create_rev: i64,
    pub version: i64,
    pub lease: i64,
}

/// The compare of a client's transaction (one key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    /// `value(key) == v` (false when the key does not exist, as in etcd).
    Value(String),
    /// `version(key) == 0`: the key does not exist.
    Absent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    Put {
        value: String,
        lease: i64,
    },
    /// A linearizable one-key range.
    Get,
    Delete,
    /// `if cmp then put(value) else get`.
    Txn {
        cmp: Cmp,
        value: String,
    },
    /// Revokes a lease that only this key was attached to.
    Revoke {
        lease: i64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Timed out, connection lost, or an error that does not say the request was not applied.
    Unknown,
    Put {
        rev: i64,
    },
    Get {
        kv: Option<Kv>,
        rev: i64,
    },
    Delete {
        deleted: i64,
        rev: i64,
    },
    /// `kv` is the else branch's get when the compare failed.
    Txn {
        succeeded: bool,
        rev: i64,
        kv: Option<Kv>,
    },
    Revoke {
        rev: i64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Op {
    pub id: usize,
    pub client: usize,
    /// Which member the request went to (1-based).
    pub member: usize,
    pub key: String,
    pub input: Input,
    pub output: Output,
    pub call: Time,
    pub ret: Time,
    /// The error text for an unknown outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// The revision this operation's response carried, if it completed.
    pub fn header_rev(&self) -> Option<i64> {
        match &self.output {
            Output::Unknown => None,
            Output::Put { rev }
            | Output::Get { rev, .. }
            | Output::Delete { rev, .. }
            | Output::Txn { rev, .. }
            | Output::Revoke { rev } => Some(*rev),
        }
    }

    /// The revision this operation created, when it certainly wrote (a put, a successful txn).
    pub fn write_rev(&self) -> Option<i64> {
        match &self.output {
            Output::Put { rev } => Some(*rev),
            Output::Txn { succeeded: true, rev, .. } => Some(*rev),
            Output::Delete { deleted, rev } if *deleted > 0 => Some(*rev),
            _ => None,
        }
    }

    /// The value this operation may have written.
    pub fn written_value(&self) -> Option<&str> {
        match &self.input {
            Input::Put { value, .. } | Input::Txn { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// One event as a watcher received it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub key: String,
    /// None for a delete.
    pub kv: Option<Kv>,
    pub mod_rev: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<Kv>,
}

/// One watch response (events of one or more revisions, or a progress notification).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchResponse {
    pub watcher: usize,
    pub member: usize,
    /// Incremented each time the watcher had to open a new stream.
    pub stream: usize,
    pub header_rev: i64,
    pub events: Vec<Event>,
    pub progress: bool,
    pub at: Time,
}

/// A watcher's stream restarts: from which revision it asked to resume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchStart {
    pub watcher: usize,
    pub member: usize,
    pub stream: usize,
    pub start_rev: i64,
    /// The stream was refused because `start_rev` was compacted.
    pub compacted: bool,
}

/// A fault the scheduler injected, for the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    pub kind: String,
    pub detail: String,
    pub start: Time,
    pub end: Time,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    pub members: usize,
    pub seed: u64,
    pub ops: Vec<Op>,
    pub watch: Vec<WatchResponse>,
    pub watch_starts: Vec<WatchStart>,
    pub faults: Vec<FaultRecord>,
    /// Highest revision compacted during the run.
    pub compacted: i64,
    /// HashKV of each member at `final_rev`, taken after the faults healed.
    pub final_rev: i64,
    pub hashes: Vec<(usize, u32)>,
}

//! Leases: every piece of lease logic in one place.
//!
//! - [`lessor`]: the state (leases, TTLs, attached keys, the leader's deadlines), pure.
//! - the leader's duties (keep-alives renewed in memory with no raft entry, a follower
//!   forwarding them to the leader over one kept peer channel; TTL queries; expiry, revokes
//!   proposed through raft; checkpoints) are the server's: `keel_server::lease_duties`.
//!
//! Grants and revokes are raft entries applied on every member (so every member has the same
//! leases and key sets, persisted in the backend as `lease/<id>` records). Expiry is the
//! leader's alone: only the leader keeps deadlines, renews them on keep-alive, and proposes a
//! revoke through raft when one passes, so all members delete a lease's keys at the same
//! revision. Remaining TTLs reach the other members as checkpoints: one raft entry per
//! interval (`lease_duties::CHECKPOINT_INTERVAL`) carries every lease renewed since the last one,
//! and about once per election timeout the leases checkpointed longest ago; a grant is its
//! lease's first checkpoint. A member that becomes leader resumes each lease from its last
//! checkpoint plus one election timeout, so a lease neither expires early because leadership
//! moved (short of a renewal in the last interval before the change) nor gets a fresh full TTL.
//!
//! Called by the apply path (grant, revoke, attach, checkpoint) and the lease duties. Calls
//! nothing of the server.

mod lessor;

pub use lessor::{aux_key, Lease, LeaseError, Lessor, AUX_PREFIX, MAX_TTL};

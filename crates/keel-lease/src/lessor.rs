//! The lessor: the leases, their TTLs, the keys attached to them, and the leader's deadlines.
//! Pure state (no I/O, no raft): the apply path changes it through grants, revokes, attached
//! keys and checkpoints; the leader's duties ([`super::leader`]) renew, expire and checkpoint.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// etcd's largest TTL (seconds).
pub const MAX_TTL: i64 = 9_000_000_000;
/// Backend record prefix for leases.
pub const AUX_PREFIX: &str = "lease/";

pub fn aux_key(id: i64) -> String {
    format!("{AUX_PREFIX}{:016x}", id as u64)
}

#[derive(Debug)]
pub struct Lease {
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// When it expires; known by the leader only.
    pub deadline: Option<Instant>,
    pub keys: BTreeSet<Vec<u8>>,
    /// Set when a revoke for it has been proposed, so it is not proposed again at once.
    pub revoking_since: Option<Instant>,
    /// The last checkpoint applied: when it was applied here, and the remaining TTL (ms) then.
    pub checkpointed: Option<(Instant, i64)>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("requested lease not found")]
    NotFound,
    #[error("lease already exists")]
    Exists,
}

#[derive(Debug, Default)]
pub struct Lessor {
    leases: HashMap<i64, Lease>,
    primary: bool,
    /// Leases renewed since the last checkpoint was taken (leader only).
    renewed: HashSet<i64>,
    /// etcd's `LeaseCheckpoint` feature: the leader checkpoints remaining TTLs through raft, and
    /// a new leader resumes each lease from its checkpoint. Off (etcd's default), a new leader
    /// gives every lease its full TTL from when it took over.
    checkpointing: bool,
}

impl Lessor {
    /// Turns checkpointing (etcd's `LeaseCheckpoint` feature) on or off.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    /// Whether the leader checkpoints remaining TTLs through raft.
    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// Whether this lessor times its leases (promoted, and not demoted since).
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    pub fn exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    pub fn ids(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.leases.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Adds a lease (apply path).
    pub fn grant(&mut self, id: i64, ttl: i64) -> Result<(), LeaseError> {
        if self.leases.contains_key(&id) {
            return Err(LeaseError::Exists);
        }
        let now = Instant::now();
        let deadline = self.primary.then(|| now + Duration::from_secs(ttl.max(0) as u64));
        // Every member applies the grant at about the same time: that is its first checkpoint
        // (a full TTL from now), so a new leader need not give it a fresh one.
        let checkpointed = Some((now, ttl.max(0).saturating_mul(1000)));
        self.leases.insert(id, Lease { id, ttl, deadline, keys: BTreeSet::new(), revoking_since: None, checkpointed });
        Ok(())
    }

    /// The keys attached to a lease (the apply path deletes them before it revokes the lease).
    pub fn keys_of(&self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        Ok(self.leases.get(&id).ok_or(LeaseError::NotFound)?.keys.iter().cloned().collect())
    }

    /// Removes a lease (apply path); returns its keys, which the caller deletes.
    pub fn revoke(&mut self, id: i64) -> Result<Vec<Vec<u8>>, LeaseError> {
        let l = self.leases.remove(&id).ok_or(LeaseError::NotFound)?;
        self.renewed.remove(&id);
        Ok(l.keys.into_iter().collect())
    }

    /// Keeps key sets in step with a write: `key` moved from lease `old` to lease `new`.
    pub fn moved(&mut self, key: &[u8], old: i64, new: i64) {
        if old == new {
            return;
        }
        if let Some(l) = self.leases.get_mut(&old) {
            l.keys.remove(key);
        }
        if let Some(l) = self.leases.get_mut(&new) {
            l.keys.insert(key.to_vec());
        }
    }

    /// Restores a lease read back from the backend (at start, or after installing a snapshot).
    pub fn restore(&mut self, id: i64, ttl: i64) {
        let deadline = self.primary.then(|| Instant::now() + Duration::from_secs(ttl.max(0) as u64));
        self.leases.insert(id, Lease { id, ttl, deadline, keys: BTreeSet::new(), revoking_since: None, checkpointed: None });
    }

    /// Records a checkpointed remaining TTL in ms (apply path, every member).
    pub fn checkpoint(&mut self, id: i64, remaining_ms: i64) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.checkpointed = Some((Instant::now(), remaining_ms.max(0)));
        }
    }

    /// Remaining TTLs (ms) of the leases this leader tracks, at most `limit`, oldest checkpoint
    /// first.
    pub fn due_checkpoints(&self, limit: usize) -> Vec<(i64, i64)> {
        if !self.primary {
            return Vec::new();
        }
        let now = Instant::now();
        let mut all: Vec<(Option<Instant>, i64, i64)> = self
            .leases
            .values()
            .filter(|l| l.revoking_since.is_none())
            .filter_map(|l| l.deadline.map(|d| (l.checkpointed.map(|c| c.0), l.id, d.saturating_duration_since(now).as_millis() as i64)))
            .collect();
        all.sort_by_key(|(at, _, _)| *at);
        all.into_iter().take(limit).map(|(_, id, ms)| (id, ms)).collect()
    }

    pub fn clear(&mut self) {
        self.leases.clear();
        self.renewed.clear();
    }

    /// Takes the leases of `new` (a state loaded from a leader's snapshot), keeping this
    /// member's role: a leader gives each a full TTL from now.
    pub fn replace_state(&mut self, new: Lessor) {
        let primary = self.primary;
        self.leases = new.leases;
        self.renewed.clear();
        self.primary = false;
        if primary {
            self.promote(Duration::ZERO);
        }
    }

    /// Remaining TTLs (ms) of the leases renewed since the last call (leader only): what the
    /// next checkpoint must carry so that a new leader does not expire them early.
    pub fn take_renewed(&mut self) -> Vec<(i64, i64)> {
        if !self.primary {
            self.renewed.clear();
            return Vec::new();
        }
        let now = Instant::now();
        let mut out: Vec<(i64, i64)> = std::mem::take(&mut self.renewed)
            .into_iter()
            .filter_map(|id| self.leases.get(&id))
            .filter(|l| l.revoking_since.is_none())
            .filter_map(|l| l.deadline.map(|d| (l.id, d.saturating_duration_since(now).as_millis() as i64)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Renews a lease (leader only); returns its TTL.
    pub fn renew(&mut self, id: i64) -> Result<i64, LeaseError> {
        let l = self.leases.get_mut(&id).ok_or(LeaseError::NotFound)?;
        if l.revoking_since.is_some() {
            // Expired and being revoked: too late to keep alive.
            return Err(LeaseError::NotFound);
        }
        l.deadline = Some(Instant::now() + Duration::from_secs(l.ttl.max(0) as u64));
        let ttl = l.ttl;
        self.renewed.insert(id);
        Ok(ttl)
    }

    /// Remaining TTL in seconds (leader only), granted TTL and keys.
    pub fn time_to_live(&self, id: i64) -> Option<(i64, i64, Vec<Vec<u8>>)> {
        let l = self.leases.get(&id)?;
        let remaining = match l.deadline {
            // etcd answers whole seconds, truncated (59 just after a 60-second grant).
            Some(d) => d.saturating_duration_since(Instant::now()).as_secs() as i64,
            None => match l.checkpointed {
                Some((at, ms)) => (at + Duration::from_millis(ms as u64)).saturating_duration_since(Instant::now()).as_secs() as i64,
                None => l.ttl,
            },
        };
        Some((remaining, l.ttl, l.keys.iter().cloned().collect()))
    }

    /// This member became leader: every lease runs from its last checkpoint plus `extend`,
    /// which covers renewals since that checkpoint, when checkpointing is on; from its full TTL
    /// plus `extend` otherwise (as etcd's lessor, which knows no remaining TTL then).
    pub fn promote(&mut self, extend: Duration) {
        self.primary = true;
        let now = Instant::now();
        let checkpointing = self.checkpointing;
        for l in self.leases.values_mut() {
            let full = now + Duration::from_secs(l.ttl.max(0) as u64) + if checkpointing { Duration::ZERO } else { extend };
            let from_checkpoint = l.checkpointed.filter(|_| checkpointing).map(|(at, ms)| at + Duration::from_millis(ms as u64) + extend);
            l.deadline = Some(from_checkpoint.map(|d| d.min(full)).unwrap_or(full));
            l.revoking_since = None;
        }
    }

    /// This member stopped leading: it no longer tracks deadlines.
    pub fn demote(&mut self) {
        self.primary = false;
        self.renewed.clear();
        for l in self.leases.values_mut() {
            l.deadline = None;
            l.revoking_since = None;
        }
    }

    /// Leases past their deadline and not already being revoked (leader only), at most `limit`;
    /// they are marked as being revoked. A revoke that did not go through is retried after
    /// `retry`.
    pub fn take_expired(&mut self, limit: usize, retry: Duration) -> Vec<i64> {
        if !self.primary {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for l in self.leases.values_mut() {
            if out.len() >= limit {
                break;
            }
            let due = l.deadline.map(|d| d <= now).unwrap_or(false);
            let retrying = l.revoking_since.map(|t| now.duration_since(t) >= retry).unwrap_or(true);
            if due && retrying {
                l.revoking_since = Some(now);
                out.push(l.id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_leader_resumes_from_the_checkpoint() {
        let mut l = Lessor::default();
        l.set_checkpointing(true);
        l.grant(1, 100).unwrap();
        l.promote(Duration::ZERO);
        let due = l.due_checkpoints(10);
        assert_eq!(due.len(), 1);
        assert!(due[0].1 > 99_000 && due[0].1 <= 100_000);
        l.demote();
        l.checkpoint(1, 7_000);
        l.promote(Duration::from_secs(1));
        let (remaining, granted, _) = l.time_to_live(1).unwrap();
        assert_eq!(granted, 100);
        // Truncated whole seconds: 6 once a few microseconds of the 7 passed.
        assert!((6..=8).contains(&remaining), "resumed from the checkpoint, not a full TTL: {remaining}");
    }

    #[test]
    fn renewals_are_checkpointed_once_in_a_batch() {
        let mut l = Lessor::default();
        l.grant(1, 100).unwrap();
        l.grant(2, 100).unwrap();
        assert!(l.renew(1).is_ok(), "not leader: renew still answers (the caller checks leadership)");
        assert!(l.take_renewed().is_empty(), "only the leader checkpoints");
        l.promote(Duration::ZERO);
        for _ in 0..50 {
            l.renew(1).unwrap();
        }
        l.renew(2).unwrap();
        let batch = l.take_renewed();
        assert_eq!(batch.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2], "one entry for 51 renewals");
        assert!(batch.iter().all(|(_, ms)| *ms > 99_000 && *ms <= 100_000));
        assert!(l.take_renewed().is_empty(), "nothing renewed since");
    }

    #[test]
    fn a_granted_lease_resumes_from_its_grant_on_a_new_leader() {
        let mut l = Lessor::default();
        l.set_checkpointing(true);
        l.grant(1, 100).unwrap();
        l.promote(Duration::from_secs(1));
        let (remaining, _, _) = l.time_to_live(1).unwrap();
        // Whole seconds, truncated as etcd answers: 99 once a few microseconds of the 100 passed.
        assert!((99..=101).contains(&remaining), "granted TTL plus one election timeout at most: {remaining}");
    }

    /// etcd's default (no `LeaseCheckpoint`): a new leader knows no remaining TTL and gives
    /// every lease its full TTL plus the extension, whatever was checkpointed.
    #[test]
    fn without_checkpointing_a_new_leader_gives_the_full_ttl() {
        let mut l = Lessor::default();
        l.grant(1, 100).unwrap();
        l.checkpoint(1, 7_000);
        l.promote(Duration::from_secs(2));
        let (remaining, _, _) = l.time_to_live(1).unwrap();
        assert!((101..=102).contains(&remaining), "full TTL plus the extension: {remaining}");
    }

    #[test]
    fn grant_attach_revoke() {
        let mut l = Lessor::default();
        l.grant(7, 10).unwrap();
        assert_eq!(l.grant(7, 10), Err(LeaseError::Exists));
        l.moved(b"a", 0, 7);
        l.moved(b"b", 0, 7);
        l.moved(b"b", 7, 0);
        assert_eq!(l.revoke(7).unwrap(), vec![b"a".to_vec()]);
        assert_eq!(l.revoke(7), Err(LeaseError::NotFound));
    }

    #[test]
    fn only_the_primary_expires_leases() {
        let mut l = Lessor::default();
        l.grant(1, 0).unwrap();
        assert!(l.take_expired(10, Duration::from_secs(1)).is_empty());
        l.promote(Duration::ZERO);
        assert_eq!(l.take_expired(10, Duration::from_secs(1)), vec![1]);
        // Not proposed twice while the first revoke is in flight.
        assert!(l.take_expired(10, Duration::from_secs(1)).is_empty());
        assert_eq!(l.renew(1), Err(LeaseError::NotFound));
        l.demote();
        assert!(l.take_expired(10, Duration::from_secs(1)).is_empty());
    }
}

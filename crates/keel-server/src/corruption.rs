//! etcd's corruption checks: the initial check (a restarted member compares its hash with its
//! peers' before it serves, `InitialCorruptCheck`), the periodic check (the leader compares
//! every `--corrupt-check-time`), and the compaction hash check (the leader compares the hashes
//! members computed when they compacted, every `--compact-hash-check-time`, `CompactHashCheck`).
//! A mismatch raises the CORRUPT alarm for the member found different (etcd's rules, below), or
//! stops the restarted member.
//!
//! Owns the checks' verdicts (pure functions of the hashes, so that they are tested without a
//! cluster) and the loops that run them. The hashes themselves are [`crate::kv_hash`]'s. Calls
//! the server for local hashes, leadership and alarms, the peer transport for the other
//! members' hashes.

use crate::kv_hash::{KeyValueHash, PeerError, PeerHash};
use crate::rafthttp::handshake::id_string as hex;
use crate::rafthttp::Transport;
use crate::server::Server;
use keel_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
use keel_proto::keelpb::internal_raft_request::Request;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// etcd's `InitialCheck` verdict: the peers whose hash differs at the same compaction revision
/// (empty: no corruption found). Peers that could not answer, or compacted differently, are
/// logged and do not count.
pub fn initial_mismatches(me: u64, local: &KeyValueHash, peers: &[PeerHash]) -> Vec<u64> {
    let mut found = Vec::new();
    for p in peers {
        match &p.answer {
            Ok(r) if r.hash != local.hash => {
                let fields =
                    (hex(me), local.revision, local.compact_revision, local.hash, hex(p.id), r.header.revision, r.compact_revision, r.hash);
                if r.compact_revision == local.compact_revision {
                    tracing::warn!(local_member_id = %fields.0, local_member_revision = fields.1, local_member_compact_revision = fields.2, local_member_hash = fields.3, remote_peer_id = %fields.4, remote_peer_revision = fields.5, remote_peer_compact_revision = fields.6, remote_peer_hash = fields.7, "found different hash values from remote peer");
                    found.push(p.id);
                } else {
                    tracing::warn!(local_member_id = %fields.0, local_member_revision = fields.1, local_member_compact_revision = fields.2, local_member_hash = fields.3, remote_peer_id = %fields.4, remote_peer_revision = fields.5, remote_peer_compact_revision = fields.6, remote_peer_hash = fields.7, "found different compact revision values from remote peer");
                }
            }
            Ok(_) => {}
            Err(PeerError::FutureRev) => {
                tracing::warn!(local_member_id = %hex(me), local_member_revision = local.revision, remote_peer_id = %hex(p.id), "cannot fetch hash from slow remote peer")
            }
            Err(PeerError::Compacted) => {
                tracing::warn!(local_member_id = %hex(me), local_member_revision = local.revision, remote_peer_id = %hex(p.id), "cannot fetch hash from remote peer; local member is behind")
            }
            Err(PeerError::ClusterIdMismatch) => {
                tracing::warn!(local_member_id = %hex(me), remote_peer_id = %hex(p.id), "cluster ID mismatch")
            }
            Err(PeerError::Other(_)) => {}
        }
    }
    found
}

/// etcd's `PeriodicCheck` verdict: `h` and `h2` are the leader's hashes before and after the
/// peers were asked (and a linearizable barrier), `rev2` its revision then. The member to raise
/// the CORRUPT alarm for (the first found; etcd raises one alarm per check), if any.
pub fn periodic_mismatch(me: u64, h: &KeyValueHash, h2: &KeyValueHash, rev2: i64, peers: &[PeerHash]) -> Option<u64> {
    let mut alarm = None;
    let mut raise = |id: u64| {
        alarm.get_or_insert(id);
    };
    if h2.hash != h.hash && h2.revision == h.revision && h.compact_revision == h2.compact_revision {
        tracing::warn!(
            revision_1 = h.revision,
            compact_revision_1 = h.compact_revision,
            hash_1 = h.hash,
            revision_2 = h2.revision,
            compact_revision_2 = h2.compact_revision,
            hash_2 = h2.hash,
            "found hash mismatch"
        );
        raise(me);
    }
    let mut checked = 0;
    for p in peers {
        let Ok(r) = &p.answer else { continue };
        checked += 1;
        if r.header.revision > rev2 {
            tracing::warn!(leader_revision = rev2, follower_revision = r.header.revision, follower_peer_id = %hex(p.id), "revision from follower must be less than or equal to leader's");
            raise(p.id);
        }
        if r.compact_revision > h2.compact_revision {
            tracing::warn!(leader_compact_revision = h2.compact_revision, follower_compact_revision = r.compact_revision, follower_peer_id = %hex(p.id), "compact revision from follower must be less than or equal to leader's");
            raise(p.id);
        }
        if r.compact_revision == h.compact_revision && r.hash != h.hash {
            tracing::warn!(leader_compact_revision = h2.compact_revision, leader_hash = h.hash, follower_compact_revision = r.compact_revision, follower_hash = r.hash, follower_peer_id = %hex(p.id), "same compact revision then hashes must match");
            raise(p.id);
        }
    }
    tracing::info!(number_of_peers_checked = checked, "finished peer corruption check");
    alarm
}

/// etcd's `checkPeerHashes` verdict for one compaction hash of the leader's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompactVerdict {
    /// Every peer answered with the same hash: checked up to this revision.
    Consistent,
    /// Some peer could not be compared: try an older hash.
    Incomplete,
    /// Hashes differ: raise the CORRUPT alarm for these members (0: the corrupted members cannot
    /// be told, no hash has a quorum).
    Corrupt(Vec<u64>),
}

pub fn compact_verdict(leader: u64, h: &KeyValueHash, peers: &[PeerHash]) -> CompactVerdict {
    let mut by_hash: BTreeMap<u32, Vec<u64>> = BTreeMap::from([(h.hash, vec![leader])]);
    let mut checked = 0;
    for p in peers {
        let reason = match &p.answer {
            Err(_) => Some("no response".to_string()),
            Ok(r) if r.compact_revision != h.compact_revision => Some(format!(
                "the peer's CompactRevision {} doesn't match leader's CompactRevision {}",
                r.compact_revision, h.compact_revision
            )),
            Ok(_) => None,
        };
        if let Some(reason) = reason {
            tracing::warn!(number_of_peers = peers.len(), leader_id = %hex(leader), peer_id = %hex(p.id), reason = %reason, "Skipped peer's hash");
            continue;
        }
        if let Ok(r) = &p.answer {
            checked += 1;
            by_hash.entry(r.hash).or_default().push(p.id);
        }
    }
    if by_hash.len() == 1 {
        if checked == peers.len() {
            tracing::info!(leader_id = %hex(leader), revision = h.revision, compact_revision = h.compact_revision, hash = h.hash, "successfully checked hash on whole cluster");
            return CompactVerdict::Consistent;
        }
        tracing::warn!(leader_id = %hex(leader), revision = h.revision, compact_revision = h.compact_revision, number_of_peers_checked = checked, number_of_peers = peers.len(), "skipped revision in compaction hash check; was not able to check all peers");
        return CompactVerdict::Incomplete;
    }
    let members = peers.len() + 1;
    let quorum = members / 2 + 1;
    let majority = by_hash.iter().find(|(_, ids)| ids.len() >= quorum).map(|(hash, _)| *hash);
    let mut alarms = Vec::new();
    match majority {
        Some(good) => {
            for (hash, ids) in by_hash.iter().filter(|(hash, _)| **hash != good) {
                tracing::error!(leader_id = %hex(leader), leader_revision = h.revision, leader_compact_revision = h.compact_revision, leader_hash = h.hash, peer_hash = *hash, peer_ids = ?ids.iter().map(|i| hex(*i)).collect::<Vec<_>>(), "Detected compaction hash mismatch");
                alarms.extend(ids.iter().copied());
            }
        }
        None => {
            tracing::error!(leader_id = %hex(leader), leader_revision = h.revision, leader_compact_revision = h.compact_revision, leader_hash = h.hash, "Detected compaction hash mismatch but cannot identify the corrupted members, so intentionally set the memberID as 0");
            alarms.push(0);
        }
    }
    CompactVerdict::Corrupt(alarms)
}

/// Every other member's hash at `rev`, asked in turn (etcd's `getPeerHashKVs`).
async fn peer_hashes(server: &Server, transport: &Transport, rev: i64) -> Vec<PeerHash> {
    let me = server.member_id();
    let ids: Vec<u64> = server.members().ids().filter(|id| *id != me).collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let answer = transport.peer_hash_kv(id, rev, server.cfg().request_timeout()).await;
        if let Err(PeerError::Other(e)) = &answer {
            tracing::warn!(remote_peer_id = %hex(id), error = %e, "failed hash kv request");
        }
        out.push(PeerHash { id, answer });
    }
    out
}

fn raise_corrupt(server: &Arc<Server>, member_id: u64) {
    let s = server.clone();
    tokio::spawn(async move {
        let req = AlarmRequest { action: AlarmAction::Activate as i32, member_id, alarm: AlarmType::Corrupt as i32 };
        if let Err(e) = s.propose(Request::Alarm(req)).await {
            tracing::warn!(error = %e, member_id = %hex(member_id), "could not raise the CORRUPT alarm");
        }
    });
}

/// etcd's `InitialCheck`, before this (restarted) member serves: an error when a peer at the
/// same compaction revision has another hash at this member's revision.
pub async fn initial_check(server: &Server, transport: &Transport) -> Result<(), String> {
    let me = server.member_id();
    tracing::info!(local_member_id = %hex(me), timeout = ?server.cfg().request_timeout(), "starting initial corruption check");
    let (h, _) = server.hash_by_rev(0).await.map_err(|e| format!("{} failed to fetch hash ({e})", hex(me)))?;
    let peers = peer_hashes(server, transport, h.revision).await;
    if !initial_mismatches(me, &h, &peers).is_empty() {
        return Err(format!("{} found data inconsistency with peers", hex(me)));
    }
    tracing::info!(local_member_id = %hex(me), "initial corruption checking passed; no corruption");
    Ok(())
}

/// etcd's `monitorKVHash`: every `every`, on the leader, the periodic check.
pub async fn run_periodic(server: Arc<Server>, transport: Transport, every: Duration) {
    tracing::info!(local_member_id = %hex(server.member_id()), interval = ?every, "enabled corruption checking");
    loop {
        tokio::time::sleep(every).await;
        if !server.raft().is_leader() {
            continue;
        }
        if let Err(e) = periodic_check(&server, &transport).await {
            tracing::warn!(error = %e, "failed to check hash KV");
        }
    }
}

async fn periodic_check(server: &Arc<Server>, transport: &Transport) -> Result<(), String> {
    let (h, _) = server.hash_by_rev(0).await.map_err(|e| e.to_string())?;
    let peers = peer_hashes(server, transport, h.revision).await;
    tokio::time::timeout(server.cfg().request_timeout(), server.linearizable_barrier())
        .await
        .map_err(|_| "etcdserver: request timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (h2, rev2) = server.hash_by_rev(0).await.map_err(|e| e.to_string())?;
    if let Some(id) = periodic_mismatch(server.member_id(), &h, &h2, rev2, &peers) {
        raise_corrupt(server, id);
    }
    Ok(())
}

/// etcd's `monitorCompactHash`: every `every`, on the leader, the compaction hash check of the
/// compaction hashes not yet checked on the whole cluster, newest first, until one is.
pub async fn run_compact_hash(server: Arc<Server>, transport: Transport, every: Duration) {
    let mut checked_up_to = 0i64;
    loop {
        tokio::time::sleep(every).await;
        if !server.raft().is_leader() {
            continue;
        }
        let me = server.member_id();
        tracing::info!(local_member_id = %hex(me), timeout = ?server.cfg().request_timeout(), "starting compact hash check");
        let hashes: Vec<KeyValueHash> =
            server.compaction_hashes().newest_first().into_iter().take_while(|h| h.revision > checked_up_to).collect();
        let mut checked = hashes.len();
        for (i, h) in hashes.iter().enumerate() {
            let peers = peer_hashes(&server, &transport, h.revision).await;
            if peers.is_empty() {
                continue;
            }
            match compact_verdict(me, h, &peers) {
                CompactVerdict::Incomplete => continue,
                CompactVerdict::Consistent => checked_up_to = checked_up_to.max(h.revision),
                CompactVerdict::Corrupt(ids) => ids.into_iter().for_each(|id| raise_corrupt(&server, id)),
            }
            checked = i + 1;
            break;
        }
        tracing::info!(number_of_hashes_checked = checked, "finished compaction hash check");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_hash::PeerHashKv;

    fn h(hash: u32, compact_revision: i64, revision: i64) -> KeyValueHash {
        KeyValueHash { hash, compact_revision, revision }
    }

    fn peer(id: u64, hash: u32, compact_revision: i64, revision: i64) -> PeerHash {
        PeerHash { id, answer: Ok(PeerHashKv::new(h(hash, compact_revision, revision), revision)) }
    }

    #[test]
    fn initial_check_counts_only_peers_at_the_same_compaction() {
        let local = h(1, 5, 10);
        let peers = [
            peer(2, 1, 5, 10),
            peer(3, 9, 6, 10),
            PeerHash { id: 4, answer: Err(PeerError::FutureRev) },
            PeerHash { id: 5, answer: Err(PeerError::Compacted) },
        ];
        assert!(initial_mismatches(1, &local, &peers).is_empty(), "a different compaction is not a mismatch");
        assert_eq!(initial_mismatches(1, &local, &[peer(2, 1, 5, 10), peer(3, 9, 5, 10)]), vec![3]);
    }

    #[test]
    fn periodic_check_follows_etcds_rules() {
        let (a, b) = (h(1, 5, 10), h(1, 5, 10));
        assert_eq!(periodic_mismatch(1, &a, &b, 10, &[peer(2, 1, 5, 10), peer(3, 1, 5, 10)]), None);
        assert_eq!(periodic_mismatch(1, &a, &b, 10, &[peer(2, 1, 5, 10), peer(3, 2, 5, 10)]), Some(3));
        // The leader's own hash changed at the same revision: the leader is corrupt.
        assert_eq!(periodic_mismatch(1, &a, &h(2, 5, 10), 10, &[]), Some(1));
        // A follower ahead of the leader, or compacted past it.
        assert_eq!(periodic_mismatch(1, &a, &b, 10, &[peer(2, 1, 5, 11)]), Some(2));
        assert_eq!(periodic_mismatch(1, &a, &b, 10, &[peer(2, 7, 6, 10)]), Some(2));
        // A peer that did not answer is not checked.
        assert_eq!(periodic_mismatch(1, &a, &b, 10, &[PeerHash { id: 2, answer: Err(PeerError::Other("down".into())) }]), None);
    }

    #[test]
    fn compaction_check_alarms_the_minority_or_member_0() {
        let l = h(1, 4, 8);
        assert_eq!(compact_verdict(1, &l, &[peer(2, 1, 4, 8), peer(3, 1, 4, 8)]), CompactVerdict::Consistent);
        assert_eq!(compact_verdict(1, &l, &[peer(2, 1, 4, 8), peer(3, 2, 4, 8)]), CompactVerdict::Corrupt(vec![3]));
        assert_eq!(compact_verdict(1, &l, &[peer(2, 2, 4, 8), peer(3, 2, 4, 8)]), CompactVerdict::Corrupt(vec![1]));
        assert_eq!(compact_verdict(1, &l, &[peer(2, 2, 4, 8), peer(3, 3, 4, 8)]), CompactVerdict::Corrupt(vec![0]));
        // A peer whose compaction differs, or that did not answer: skipped; the rest agree.
        assert_eq!(compact_verdict(1, &l, &[peer(2, 1, 4, 8), peer(3, 9, 5, 8)]), CompactVerdict::Incomplete);
        let down = PeerHash { id: 3, answer: Err(PeerError::Other("down".into())) };
        assert_eq!(compact_verdict(1, &l, &[peer(2, 1, 4, 8), down]), CompactVerdict::Incomplete);
    }
}

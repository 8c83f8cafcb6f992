//! The leader's lease duties: renewals, TTL queries, expiry and checkpoints (the lease state
//! itself is [`keel_lease`]'s). Calls the server to propose and read, the peer transport to
//! forward to the leader.
//!
//! Renewals change only the leader's in-memory deadline. With etcd's `LeaseCheckpoint` feature
//! on, [`run`] batches what they changed into one checkpoint entry per [`CHECKPOINT_INTERVAL`]
//! (and refreshes the others every election timeout) so that a new leader resumes each lease
//! where it was; off (etcd's default) no checkpoint is proposed and a new leader gives every
//! lease its full TTL, as etcd does. A follower forwards keep-alives and TTL
//! queries to the leader (the peer transport keeps one channel to it).

use crate::error::Error;
use crate::rafthttp::Transport;
use crate::server::Server;
use keel_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use keel_proto::keelpb::internal_raft_request::Request as Internal;
use std::sync::Arc;
use std::time::Duration;

/// How often renewals are checkpointed through raft (one entry for all of them).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// Most leases refreshed per election timeout besides the renewed ones.
const REFRESH_PER_ELECTION: usize = 1000;
/// etcd revokes at most 1000 leases per second.
const REVOKES_PER_TURN: usize = 100;

/// Keep-alive: renewed in this member's memory if it leads, else on the leader. Returns the
/// lease's TTL (0: no such lease, as etcd answers).
pub async fn renew(server: &Server, transport: &Transport, id: i64) -> Result<i64, Error> {
    if server.raft().is_leader() {
        return renew_leading(server, id).await;
    }
    let leader = server.raft().leader();
    if leader == 0 {
        return Err(Error::NoLeader);
    }
    transport.forward_lease_renew(leader, id).await.map_err(Error::Forwarded)
}

/// Renews a lease on this leading member (a client's keep-alive, or one a follower forwarded):
/// its TTL, or 0 when it is gone. A lease granted through another member may be committed but
/// not yet applied here: the renewal waits for everything committed to be applied before
/// answering that a lease is gone (etcd 3.7's FastLeaseKeepAlive, on by default), or before
/// every renewal with that gate off (as etcd 3.6).
pub async fn renew_leading(server: &Server, id: i64) -> Result<i64, Error> {
    if !server.fast_lease_keep_alive() || !server.lessor().exists(id) {
        server.linearizable_barrier().await?;
    }
    Ok(renew_here(server, id))
}

/// Renews a lease in this (leading) member's lessor: its TTL, or 0 when it is gone. The
/// batched checkpoint carries the renewal to the followers.
fn renew_here(server: &Server, id: i64) -> i64 {
    let ttl = server.lessor().renew(id).unwrap_or(0);
    if ttl > 0 {
        keel_metrics::METRICS.lease_renewed.inc();
    }
    ttl
}

/// TTL query on this member if it leads, else on the leader.
pub async fn time_to_live(server: &Server, transport: &Transport, r: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, Error> {
    if server.raft().is_leader() {
        return Ok(local_time_to_live(server, &r));
    }
    let leader = server.raft().leader();
    if leader == 0 {
        return Err(Error::NoLeader);
    }
    transport.forward_lease_ttl(leader, r).await.map_err(Error::Forwarded)
}

/// The leader's answer to a TTL query; TTL -1 for a lease that does not exist.
pub fn local_time_to_live(server: &Server, r: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
    let rev = server.store().current_rev();
    match server.lessor().time_to_live(r.id) {
        Some((ttl, granted, keys)) => LeaseTimeToLiveResponse {
            header: server.header(rev),
            id: r.id,
            ttl,
            granted_ttl: granted,
            keys: if r.keys { keys } else { vec![] },
        },
        None => LeaseTimeToLiveResponse { header: server.header(rev), id: r.id, ttl: -1, granted_ttl: 0, keys: vec![] },
    }
}

/// Demotes the lessor when this member stops leading (the apply stage promotes it when a new
/// leader's no-op is applied); as leader, checkpoints renewals in one batched entry per interval
/// and revokes leases whose deadline passed, through raft.
pub async fn run(server: Arc<Server>) {
    server.lessor().set_checkpointing(server.cfg().lease_checkpoint());
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let election = Duration::from_millis(server.cfg().election_timeout);
    let mut last_refresh = tokio::time::Instant::now();
    // One checkpoint in flight at a time: a slow one is not joined by more.
    let mut inflight: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tick.tick().await;
        if !server.raft().is_leader() {
            let mut lessor = server.lessor();
            // Read again under the lock the apply stage promotes under: a member elected since
            // the first read keeps the promotion its no-op gave it.
            if lessor.is_primary() && !server.raft().is_leader() {
                lessor.demote();
            }
            continue;
        }
        if !server.lessor().checkpointing() {
            // etcd's default: renewals stay in the leader's memory; no checkpoint entries.
            server.lessor().take_renewed();
        } else if inflight.as_ref().map(|h| h.is_finished()).unwrap_or(true) {
            let mut batch = server.lessor().take_renewed();
            if last_refresh.elapsed() >= election {
                last_refresh = tokio::time::Instant::now();
                let have: std::collections::HashSet<i64> = batch.iter().map(|(id, _)| *id).collect();
                batch.extend(server.lessor().due_checkpoints(REFRESH_PER_ELECTION).into_iter().filter(|(id, _)| !have.contains(id)));
            }
            if !batch.is_empty() {
                let checkpoints = batch
                    .into_iter()
                    .map(|(id, remaining_ms)| LeaseCheckpoint { id, remaining_ttl: crate::entry::remaining_seconds(remaining_ms) })
                    .collect();
                let s = server.clone();
                inflight = Some(tokio::spawn(async move {
                    if let Err(e) = s.propose(Internal::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints })).await {
                        tracing::debug!(error = %e, "lease checkpoint failed; the next refresh carries it");
                    }
                }));
            }
        }
        let expired = server.lessor().take_expired(REVOKES_PER_TURN, Duration::from_secs(3));
        for id in expired {
            keel_metrics::METRICS.lease_expired.inc();
            let s = server.clone();
            tokio::spawn(async move {
                if let Err(e) = s.propose_as_root(Internal::LeaseRevoke(LeaseRevokeRequest { id })).await {
                    if !matches!(e, Error::Lease(keel_lease::LeaseError::NotFound)) {
                        tracing::warn!(lease = format!("{id:x}"), error = %e, "failed to revoke an expired lease; will retry");
                    }
                }
            });
        }
    }
}

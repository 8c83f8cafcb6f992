//! Starting on an etcd data dir: `member/wal` in etcd's WAL format, `member/snap/*.snap`, and
//! `member/snap/db` (bbolt), whether `etcdctl`/`etcdutl snapshot restore` made it or a stopped
//! etcd member left it. The conversion keeps the member and cluster IDs, the membership, every
//! revision and the raft term, so that the members of a cluster can be converted one by one and
//! find each other again.
//!
//! The Keel member starts at a snapshot at the backend's consistent index C (everything up to it
//! is in etcd's backend), with the member list as of the last committed membership change. The
//! WAL's entries after C follow, at the same indexes and terms: each etcd request becomes the
//! Keel request with the same effect (`request.rs`), applied when the member starts as any
//! committed entry is; membership changes and requests that change nothing Keel keeps become
//! empty entries. An etcd request Keel does not know, or an uncommitted membership change,
//! refuses the conversion with the commands that make a convertible copy.
//!
//! Durability and the original: the Keel files are written and synced in `member.keel-new`;
//! then `member` is renamed to `member.etcd` (kept: the way back to etcd) and `member.keel-new`
//! to `member`, each rename followed by a directory fsync. A crash between the renames is
//! finished at the next start.

use super::backend::MemberJson;
use super::request::Translated;
use super::wal::{self, ConfChange};
use anyhow::{bail, Context, Result};
use keel_proto::keelpb::MemberRecord;
use keel_server::membership::{Members, AUX_MEMBERS};
use prost::Message;
use std::path::{Path, PathBuf};

const NEW: &str = "member.keel-new";
const KEPT: &str = "member.etcd";

fn sync_dir(d: &Path) -> Result<()> {
    std::fs::File::open(d).and_then(|f| f.sync_all()).with_context(|| format!("fsync {}", d.display()))
}

/// True when `data_dir` holds an etcd member (its backend is a bbolt file), or a conversion that
/// stopped between its renames.
pub fn needs_conversion(data_dir: &Path) -> bool {
    let member = data_dir.join("member");
    super::is_bbolt(&member.join("snap/db")) || (!member.exists() && data_dir.join(NEW).exists() && data_dir.join(KEPT).exists())
}

/// Converts the etcd member in `data_dir` to a Keel member in place (see the module doc).
pub fn convert(data_dir: &Path, wal_dir: &Path) -> Result<()> {
    let member = data_dir.join("member");
    let (new, kept) = (data_dir.join(NEW), data_dir.join(KEPT));
    if !member.exists() && new.exists() && kept.exists() {
        std::fs::rename(&new, &member).with_context(|| format!("rename {} to {}", new.display(), member.display()))?;
        sync_dir(data_dir)?;
        tracing::info!(data_dir = %data_dir.display(), "finished converting the etcd data dir (the etcd files are in member.etcd)");
        return Ok(());
    }
    if wal_dir != member.join("wal") {
        bail!(
            "the etcd data dir {} has its WAL in {} (--wal-dir): convert it with the WAL in member/wal, or take `etcdctl snapshot save` and `keel snapshot restore`",
            data_dir.display(),
            wal_dir.display()
        );
    }
    if kept.exists() {
        bail!("{} exists: a converted etcd member is kept there; move it away to convert {} again", kept.display(), member.display());
    }
    let _ = std::fs::remove_dir_all(&new);
    let started = std::time::Instant::now();
    tracing::info!(data_dir = %data_dir.display(), "converting an etcd data dir to Keel's format");
    if let Err(e) = build(&member, &new) {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e);
    }
    std::fs::rename(&member, &kept).with_context(|| format!("rename {} to {}", member.display(), kept.display()))?;
    sync_dir(data_dir)?;
    std::fs::rename(&new, &member).with_context(|| format!("rename {} to {}", new.display(), member.display()))?;
    sync_dir(data_dir)?;
    tracing::info!(took = ?started.elapsed(), kept = %kept.display(), "converted the etcd data dir; the etcd files are kept");
    Ok(())
}

/// The newest `.snap` in `snap_dir` that the WAL marks as saved.
fn newest_snapshot(snap_dir: &Path, log: &wal::Log) -> Result<Option<super::snap::Snap>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(snap_dir)
        .with_context(|| format!("read {}", snap_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    names.sort();
    for p in names.iter().rev() {
        let s = super::snap::read(p)?;
        if log.snapshots.iter().any(|m| m.index == s.index && m.term == s.term) {
            return Ok(Some(s));
        }
        tracing::warn!(file = %p.display(), "etcd snapshot file without a WAL mark skipped");
    }
    Ok(None)
}

/// Applies etcd's membership change `cc` to `members`.
fn apply_conf_change(members: &mut Vec<MemberRecord>, kind: i32, cc: &ConfChange) -> Result<()> {
    match cc.kind {
        wal::CONF_REMOVE_NODE => members.retain(|m| m.id != cc.node_id),
        wal::CONF_ADD_NODE | wal::CONF_ADD_LEARNER | wal::CONF_UPDATE_NODE => {
            let m: MemberJson = serde_json::from_slice(&cc.context)
                .with_context(|| format!("membership change for {:x}: undecodable context", cc.node_id))?;
            let mut rec = MemberRecord::from(m);
            rec.is_learner |= cc.kind == wal::CONF_ADD_LEARNER;
            match members.iter_mut().find(|x| x.id == rec.id) {
                Some(x) if cc.kind == wal::CONF_UPDATE_NODE => x.peer_urls = rec.peer_urls,
                Some(x) => {
                    // An add of an existing member: a learner promoted (etcd's promote).
                    x.is_learner = rec.is_learner;
                    x.peer_urls = rec.peer_urls;
                }
                None => members.push(rec),
            }
            members.sort_by_key(|m| m.id);
        }
        other => bail!("unknown membership change type {other} (entry type {kind})"),
    }
    Ok(())
}

/// Writes the Keel member for etcd's `member` dir into `new`, synced.
fn build(member: &Path, new: &Path) -> Result<()> {
    let (etcd_wal, etcd_snap) = (member.join("wal"), member.join("snap"));
    let log = wal::read(&etcd_wal)?;
    let snap = newest_snapshot(&etcd_snap, &log)?;
    let (snap_index, snap_term) = snap.as_ref().map(|s| (s.index, s.term)).unwrap_or((0, 0));
    let db = keel_bbolt::Db::open(&etcd_snap.join("db"))?;
    std::fs::create_dir_all(new.join("snap")).with_context(|| format!("create {}", new.display()))?;
    let db_path = new.join("snap/db");
    let imported = super::backend::import(&db, &db_path)?;
    let applied = imported.meta.consistent_index;
    if applied < snap_index {
        bail!("the etcd backend is at index {applied}, older than its snapshot at {snap_index}: start etcd once to let it catch up");
    }
    let commit = log.hard_state.commit;
    // Membership: the backend's (etcd 3.5+), else the snapshot's v2 store; then every
    // committed membership change and published attribute in the log after it.
    let from_backend = !imported.members.is_empty();
    let mut members = if from_backend { imported.members.clone() } else { snap.as_ref().map(|s| s.members.clone()).unwrap_or_default() };
    let mut entries = Vec::new();
    let (mut requests, mut nothing) = (0usize, 0usize);
    for e in log.entries.iter().filter(|e| e.index > snap_index) {
        let beyond = e.index > applied;
        let mut out = keel_raft::eraftpb::Entry { index: e.index, term: e.term, ..Default::default() };
        match e.kind {
            wal::ENTRY_CONF_CHANGE => {
                if e.index > commit {
                    bail!(
                        "etcd's WAL has an uncommitted membership change at index {}: start the etcd cluster to commit it, stop it, then convert",
                        e.index
                    );
                }
                if beyond || !from_backend {
                    let cc = ConfChange::decode(e.data.as_slice())
                        .with_context(|| format!("entry {}: undecodable membership change", e.index))?;
                    apply_conf_change(&mut members, e.kind, &cc)?;
                }
            }
            wal::ENTRY_NORMAL if e.data.is_empty() => {}
            wal::ENTRY_NORMAL => match super::request::translate(&e.data).with_context(|| format!("etcd WAL entry {}", e.index))? {
                Translated::Attributes { id, name, client_urls } => {
                    if e.index <= commit {
                        if let Some(m) = members.iter_mut().find(|m| m.id == id) {
                            m.name = name;
                            m.client_urls = client_urls;
                        }
                    }
                }
                Translated::Request(r) if beyond => {
                    out.data = r.encode_to_vec().into();
                    requests += 1;
                }
                Translated::Request(_) | Translated::Nothing => nothing += 1,
            },
            other => bail!("entry {}: unsupported entry type {other} (a joint-consensus change?)", e.index),
        }
        if beyond {
            entries.push(out);
        }
    }
    let term = if applied == snap_index && snap.is_some() {
        snap_term
    } else if applied == 0 {
        // Nothing was ever applied (etcd stopped before its first entry).
        0
    } else if let Some(e) = log.entries.iter().find(|e| e.index == applied) {
        e.term
    } else if imported.meta.term > 0 {
        imported.meta.term
    } else {
        bail!("no term for index {applied}: the etcd WAL does not reach its backend's index")
    };
    if let Some(first) = entries.first() {
        if first.index != applied + 1 {
            bail!("the etcd WAL starts at index {} after its backend's index {applied}: entries are missing", first.index);
        }
    }
    if members.is_empty() {
        bail!("no members found in the etcd data dir (no members bucket, snapshot or membership entries)");
    }
    let members = Members { cluster_id: log.metadata.cluster_id, members, removed: vec![] };
    if !members.members.iter().any(|m| m.id == log.metadata.node_id) {
        bail!("this member ({:x}) is not in the etcd cluster's member list", log.metadata.node_id);
    }
    let mut store = keel_mvcc::Store::open(&db_path)?;
    store.set_aux(AUX_MEMBERS, members.encode());
    store.set_consistent_index(applied, term);
    store.commit()?;
    let rev = store.current_rev();
    drop(store);

    let conf = keel_raft::eraftpb::ConfState {
        voters: members.members.iter().filter(|m| !m.is_learner).map(|m| m.id).collect(),
        learners: members.members.iter().filter(|m| m.is_learner).map(|m| m.id).collect(),
        ..Default::default()
    };
    let voters = conf.voters.clone();
    let snapshot = keel_raft::storage::snapshot_at(applied, term, conf, members.encode());
    let hs = keel_raft::eraftpb::HardState {
        term: log.hard_state.term.max(term),
        vote: log.hard_state.vote,
        commit: commit.clamp(applied, entries.last().map(|e| e.index).unwrap_or(applied)),
        ..Default::default()
    };
    let identity = keel_raft::Identity { cluster_id: log.metadata.cluster_id, member_id: log.metadata.node_id, initial_voters: voters };
    keel_raft::Disk::create_at_snapshot(&new.join("wal"), &new.join("snap"), identity, &snapshot, &entries, &hs)?;
    sync_dir(&new.join("snap"))?;
    sync_dir(new)?;
    tracing::info!(
        member_id = format!("{:x}", log.metadata.node_id),
        cluster_id = format!("{:x}", log.metadata.cluster_id),
        applied_index = applied,
        commit = hs.commit,
        term,
        revision = rev,
        compacted = imported.meta.compacted_rev,
        revisions = imported.revisions,
        members = members.members.len(),
        replayed_requests = requests,
        skipped_requests = nothing,
        "read the etcd member"
    );
    Ok(())
}

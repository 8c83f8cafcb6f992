//! A member's persistent raft state: WAL (entries, hard state, snapshot markers) and snapshot
//! files. Read back once at start; written by the node afterwards. The WAL's records are etcd's:
//! the metadata is `etcdserverpb.Metadata` (member and cluster ID, plus Keel's initial voters in
//! a field etcd skips), entries `raftpb.Entry`, hard states `raftpb.HardState`, snapshot markers
//! `walpb.Snapshot`. A WAL an older Keel wrote in its own format is rewritten in etcd's at start
//! ([`upgrade_legacy_wal`]).

use crate::wire::{ChangeKind, MemberChange};
use keel_wal::{RecordAt, Snapshotter, Wal, WalOptions, RECORD_ENTRY, RECORD_SNAPSHOT, RECORD_STATE};
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, Entry, EntryType, HardState, Snapshot};
use std::path::{Path, PathBuf};

/// Errors reading or writing a member's raft state.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Wal(#[from] keel_wal::Error),
    #[error("raft state in {path}: {msg}")]
    Decode { path: PathBuf, msg: String },
}

/// Who this member is. Written as the metadata record that starts every WAL segment, so that a
/// restarted member keeps its identity whatever its flags say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
    /// Voters of the initial configuration (before any membership change).
    pub initial_voters: Vec<u64>,
}

/// etcd's `etcdserverpb.Metadata`, the WAL's metadata record, with Keel's one addition.
#[derive(Clone, PartialEq, prost::Message)]
struct PMetadata {
    #[prost(uint64, tag = "1")]
    node_id: u64,
    #[prost(uint64, tag = "2")]
    cluster_id: u64,
    /// Voters of the initial configuration (Keel's; a field number etcd does not use).
    #[prost(uint64, repeated, packed = "false", tag = "1000")]
    keel_initial_voters: Vec<u64>,
}

impl Identity {
    fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&PMetadata {
            node_id: self.member_id,
            cluster_id: self.cluster_id,
            keel_initial_voters: self.initial_voters.clone(),
        })
    }

    fn decode(b: &[u8]) -> Option<Identity> {
        let m: PMetadata = prost::Message::decode(b).ok()?;
        Some(Identity { cluster_id: m.cluster_id, member_id: m.node_id, initial_voters: m.keel_initial_voters })
    }

    /// The metadata record of the format older Keel versions wrote.
    #[cfg(test)]
    fn encode_legacy(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + 8 * self.initial_voters.len());
        b.extend_from_slice(&self.cluster_id.to_be_bytes());
        b.extend_from_slice(&self.member_id.to_be_bytes());
        for v in &self.initial_voters {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn decode_legacy(b: &[u8]) -> Option<Identity> {
        if b.len() < 16 || !b.len().is_multiple_of(8) {
            return None;
        }
        let word = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        Some(Identity { cluster_id: word(0), member_id: word(1), initial_voters: (2..b.len() / 8).map(word).collect() })
    }
}

/// Everything read back from disk at start, plus the open WAL and snapshotter.
pub struct Disk {
    pub identity: Identity,
    /// True when this start created the WAL (a new member).
    pub fresh: bool,
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot, in index order (until the node starts: it takes them).
    pub entries: Vec<Entry>,
    /// Where in the WAL each of `entries` lies (as many, or none).
    pub(crate) placed: Vec<RecordAt>,
    pub hard_state: HardState,
    /// Set by [`Disk::force_new_cluster`]: this member is to lead alone once its log is applied.
    pub(crate) forced: bool,
    pub(crate) wal: Wal,
    pub(crate) snapshotter: Snapshotter,
}

fn decode_err(path: &Path, msg: impl std::fmt::Display) -> DiskError {
    DiskError::Decode { path: path.to_path_buf(), msg: msg.to_string() }
}

impl Disk {
    /// A new member's state around a just-created WAL (nothing in it yet).
    fn new_member(identity: Identity, hard_state: HardState, wal: Wal, snapshotter: Snapshotter) -> Disk {
        Disk { identity, fresh: true, snapshot: None, entries: Vec::new(), placed: Vec::new(), hard_state, forced: false, wal, snapshotter }
    }

    /// True if `wal_dir` already holds a WAL (the member was started before).
    pub fn exists(wal_dir: &Path) -> bool {
        Wal::exists(wal_dir)
    }

    /// Opens the member's raft state, creating it with `identity` when there is none.
    ///
    /// A new cluster's members start with the same log (as etcd bootstraps): one committed
    /// AddNode conf change per initial member at term 1, carrying `bootstrap`'s context bytes, so
    /// that a member added later learns the initial membership from the log. A member joining an
    /// existing cluster passes no bootstrap entries and receives the log from the leader.
    pub fn open(wal_dir: &Path, snap_dir: &Path, identity: Identity, bootstrap: &[(u64, Vec<u8>)]) -> Result<Disk, DiskError> {
        upgrade_legacy_wal(wal_dir)?;
        let snapshotter = Snapshotter::new(snap_dir)?;
        snapshotter.remove_partial_files()?;
        if !Wal::exists(wal_dir) {
            let wal = Wal::create(wal_dir, &identity.encode(), WalOptions::default())?;
            let mut entries = Vec::with_capacity(bootstrap.len());
            for (i, (id, ctx)) in bootstrap.iter().enumerate() {
                let cc = MemberChange { id: 0, kind: ChangeKind::AddNode, node_id: *id, context: ctx.clone().into() };
                let mut e = Entry::default();
                e.set_entry_type(EntryType::EntryConfChange);
                e.term = 1;
                e.index = i as u64 + 1;
                e.data = cc.encode().into();
                entries.push(e);
            }
            let mut hard_state = HardState::default();
            if !entries.is_empty() {
                hard_state.term = 1;
                hard_state.commit = entries.len() as u64;
            }
            let mut disk = Disk::new_member(identity, hard_state.clone(), wal, snapshotter);
            if !entries.is_empty() {
                disk.save(Some(&hard_state), &entries)?;
                disk.placed = disk.wal.placed()[..entries.len()].to_vec();
            }
            disk.entries = entries;
            return Ok(disk);
        }
        let snapshot = match snapshotter.load_newest()? {
            Some(f) => {
                let s = crate::wire::snapshot_of(&f.data).map_err(|e| decode_err(snap_dir, e))?;
                if s.get_metadata().index != f.index || s.get_metadata().term != f.term {
                    return Err(decode_err(snap_dir, "snapshot file name does not match its contents"));
                }
                Some(s)
            }
            None => None,
        };
        let (wal, records, places) = Wal::open_placed(wal_dir, WalOptions::default())?;
        let identity = Identity::decode(wal.metadata()).ok_or_else(|| decode_err(wal_dir, "bad WAL metadata record"))?;
        let snap_index = snapshot.as_ref().map(|s| s.get_metadata().index).unwrap_or(0);
        let mut entries: Vec<Entry> = Vec::new();
        let mut placed: Vec<RecordAt> = Vec::new();
        let mut hard_state = HardState::default();
        let mut saw_snapshot_marker = snap_index == 0;
        for (r, at) in records.into_iter().zip(places) {
            match r.kind {
                RECORD_ENTRY => {
                    let e = crate::wire::log_entry(&r.data).map_err(|e| decode_err(wal_dir, e))?;
                    if e.index <= snap_index {
                        continue;
                    }
                    // A later entry at an index replaces that one and everything after it
                    // (a new leader overwrote an uncommitted tail).
                    if let Some(first) = entries.first().map(|f| f.index) {
                        if e.index < first {
                            entries.clear();
                        } else {
                            entries.truncate((e.index - first) as usize);
                        }
                        placed.truncate(entries.len());
                    }
                    if let Some(last) = entries.last() {
                        if last.index + 1 != e.index {
                            return Err(decode_err(wal_dir, format!("gap in WAL entries: {} then {}", last.index, e.index)));
                        }
                    } else if e.index != snap_index + 1 {
                        return Err(decode_err(wal_dir, format!("WAL entries start at {} but the snapshot is at {}", e.index, snap_index)));
                    }
                    entries.push(e);
                    placed.push(at);
                }
                RECORD_STATE => {
                    hard_state = crate::wire::hard_state(&r.data).map_err(|e| decode_err(wal_dir, e))?;
                }
                RECORD_SNAPSHOT => {
                    let (idx, _) = crate::wire::wal_snapshot_mark(&r.data).map_err(|e| decode_err(wal_dir, e))?;
                    if idx == snap_index {
                        saw_snapshot_marker = true;
                    }
                }
                _ => {}
            }
        }
        if !saw_snapshot_marker {
            tracing::warn!(snapshot_index = snap_index, "raft: snapshot file has no matching WAL marker");
        }
        tracing::info!(
            member_id = format!("{:x}", identity.member_id),
            cluster_id = format!("{:x}", identity.cluster_id),
            snapshot_index = snap_index,
            entries = entries.len(),
            commit = hard_state.commit,
            term = hard_state.term,
            "raft: recovered state from WAL and snapshot"
        );
        Ok(Disk { identity, fresh: false, snapshot, entries, placed, hard_state, forced: false, wal, snapshotter })
    }

    /// Turns the recovered log into a one-member cluster's (etcd's `--force-new-cluster`):
    /// entries after the commit index are dropped (`applied`, the backend's index, counts as
    /// committed), and entries removing every other voter and learner of the configuration the
    /// committed log ends with are appended as committed, durably, before raft starts. Applying
    /// them removes those members from raft and from the member list like any removal. Returns
    /// the removed IDs (none when this member is alone already).
    pub fn force_new_cluster(&mut self, applied: u64) -> Result<Vec<u64>, DiskError> {
        let snap_index = self.snapshot.as_ref().map(|s| s.get_metadata().index).unwrap_or(0);
        let last = self.entries.last().map(|e| e.index).unwrap_or(snap_index);
        let commit = self.hard_state.commit.max(applied).max(snap_index).min(last);
        self.entries.retain(|e| e.index <= commit);
        self.placed.truncate(self.entries.len());
        let mut ids: std::collections::BTreeSet<u64> = match &self.snapshot {
            Some(s) => {
                let cs = s.get_metadata().get_conf_state();
                cs.voters.iter().chain(&cs.learners).chain(&cs.voters_outgoing).chain(&cs.learners_next).copied().collect()
            }
            None => self.identity.initial_voters.iter().copied().collect(),
        };
        for e in &self.entries {
            let changes: Vec<(ConfChangeType, u64)> = match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    let cc = crate::wire::member_change(&e.data).map_err(|err| decode_err(Path::new("wal"), err))?;
                    // An update changes no configuration.
                    cc.to_raft().map(|c| (c.get_change_type(), c.node_id)).into_iter().collect()
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = crate::wire::conf_change_v2(&e.data).map_err(|err| decode_err(Path::new("wal"), err))?;
                    cc.get_changes().iter().map(|c| (c.get_change_type(), c.node_id)).collect()
                }
                EntryType::EntryNormal => continue,
            };
            for (kind, id) in changes {
                match kind {
                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => ids.insert(id),
                    ConfChangeType::RemoveNode => ids.remove(&id),
                };
            }
        }
        let me = self.identity.member_id;
        let term = self.hard_state.term.max(self.entries.last().map(|e| e.term).unwrap_or(0));
        let mut added = Vec::new();
        let mut next = commit + 1;
        let mut push = |kind: ChangeKind, id: u64| -> Result<(), DiskError> {
            let cc = MemberChange { id: 0, kind, node_id: id, context: Default::default() };
            let mut e = Entry::default();
            e.set_entry_type(EntryType::EntryConfChange);
            e.term = term;
            e.index = next;
            e.data = cc.encode().into();
            added.push(e);
            next += 1;
            Ok(())
        };
        let removed: Vec<u64> = ids.iter().copied().filter(|id| *id != me).collect();
        for id in &removed {
            push(ChangeKind::RemoveNode, *id)?;
        }
        if !ids.contains(&me) {
            push(ChangeKind::AddNode, me)?;
        }
        let mut hs = self.hard_state.clone();
        hs.term = term;
        hs.commit = added.last().map(|e| e.index).unwrap_or(commit);
        self.save(Some(&hs), &added)?;
        self.placed.truncate(self.entries.len());
        if self.placed.len() == self.entries.len() {
            self.placed.extend_from_slice(&self.wal.placed()[..added.len()]);
        }
        self.entries.extend(added);
        self.hard_state = hs;
        self.forced = true;
        tracing::warn!(
            member_id = format!("{me:x}"),
            commit,
            removed = ?removed.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>(),
            "forcing restart member as a one-member cluster (--force-new-cluster): uncommitted entries dropped"
        );
        Ok(removed)
    }

    /// Creates a member's raft state that starts at `snap` (a member converted from another
    /// store's data, whose log before the snapshot is not kept), followed by `entries` (which
    /// must continue from the snapshot's index), with `hard_state`; durable when this returns.
    /// Fails if `wal_dir` already holds a WAL.
    pub fn create_at_snapshot(
        wal_dir: &Path,
        snap_dir: &Path,
        identity: Identity,
        snap: &Snapshot,
        entries: &[Entry],
        hard_state: &HardState,
    ) -> Result<(), DiskError> {
        for (due, e) in (snap.get_metadata().index + 1..).zip(entries) {
            if e.index != due {
                return Err(decode_err(wal_dir, format!("entry {} where {due} was due", e.index)));
            }
        }
        if Wal::exists(wal_dir) {
            return Err(decode_err(wal_dir, "a WAL exists already"));
        }
        let snapshotter = Snapshotter::new(snap_dir)?;
        let wal = Wal::create(wal_dir, &identity.encode(), WalOptions::default())?;
        let mut disk = Disk::new_member(identity, hard_state.clone(), wal, snapshotter);
        disk.save_snapshot(snap, u64::MAX)?;
        disk.save(Some(hard_state), entries)?;
        Ok(())
    }

    /// The commit index of the last hard state saved (or read at start).
    pub(crate) fn saved_commit(&self) -> u64 {
        self.hard_state.commit
    }

    /// Appends entries and hard state; durable when this returns.
    pub(crate) fn save(&mut self, hs: Option<&HardState>, entries: &[Entry]) -> Result<(), DiskError> {
        self.append(hs, entries, true)
    }

    /// What a Ready asks to persist: as [`Disk::save`], but a hard state that only moves the
    /// commit index is written without waiting for the disk, as etcd's `MustSync` decides (raft
    /// learns a lost commit index again from the leader): the next save that must be durable
    /// makes it durable too. Entries, a new term or a vote are always durable on return.
    /// Returns where in the WAL each entry went, in order.
    pub(crate) fn save_ready(&mut self, hs: Option<&HardState>, entries: &[Entry]) -> Result<&[RecordAt], DiskError> {
        let sync = must_sync(&self.hard_state, hs, entries.len());
        self.append(hs, entries, sync)?;
        Ok(&self.wal.placed()[..entries.len()])
    }

    fn append(&mut self, hs: Option<&HardState>, entries: &[Entry], sync: bool) -> Result<(), DiskError> {
        let mut bufs: Vec<(u8, Vec<u8>)> = Vec::with_capacity(entries.len() + 1);
        for e in entries {
            bufs.push((RECORD_ENTRY, e.write_to_bytes().map_err(|e| decode_err(Path::new("wal"), e))?));
        }
        if let Some(hs) = hs {
            bufs.push((RECORD_STATE, hs.write_to_bytes().map_err(|e| decode_err(Path::new("wal"), e))?));
        }
        let next = entries.last().map(|e| e.index + 1).unwrap_or(0);
        let refs: Vec<(u8, &[u8])> = bufs.iter().map(|(k, d)| (*k, d.as_slice())).collect();
        if sync {
            self.wal.save(&refs, next)?;
        } else {
            self.wal.write(&refs, next)?;
        }
        if let Some(hs) = hs {
            self.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Durably saves a snapshot file and its WAL marker, then releases WAL segments it covers
    /// that hold no entry from `keep_from` on (the raft log reads those back).
    pub(crate) fn save_snapshot(&mut self, snap: &Snapshot, keep_from: u64) -> Result<(), DiskError> {
        let m = snap.get_metadata();
        let bytes = snap.write_to_bytes().map_err(|e| decode_err(Path::new("snap"), e))?;
        self.snapshotter.save(m.term, m.index, &bytes)?;
        let marker = crate::wire::wal_snapshot_record(m.index, m.term, Some(m.get_conf_state()));
        // A snapshot covers only committed entries: the hard state says so too, as etcd's
        // raft requires of a WAL it restarts from (its commit at least the snapshot's index).
        if self.hard_state.commit < m.index {
            let mut hs = self.hard_state.clone();
            hs.commit = m.index;
            let state = hs.write_to_bytes().map_err(|e| decode_err(Path::new("wal"), e))?;
            self.wal.save(&[(RECORD_SNAPSHOT, &marker), (RECORD_STATE, &state)], m.index + 1)?;
            self.hard_state = hs;
        } else {
            self.wal.save(&[(RECORD_SNAPSHOT, &marker)], m.index + 1)?;
        }
        self.wal.release_to(m.index.min(keep_from.saturating_sub(1)))?;
        Ok(())
    }
}

/// Whether a Ready's writes must be durable before its messages go out (etcd's `MustSync`):
/// entries, or a hard state with a new term or vote. A commit index alone need not be.
fn must_sync(prev: &HardState, hs: Option<&HardState>, entries: usize) -> bool {
    entries != 0 || hs.is_some_and(|h| h.term != prev.term || h.vote != prev.vote)
}

/// Rewrites a WAL an older Keel wrote in its own format (`keel_wal::legacy`) in etcd's, keeping
/// every record: the new WAL is written and synced beside the old one (`<wal>.etcd-format`),
/// the old one is renamed to `<wal>.keel-legacy`, the new one into place, then the old one is
/// removed, each step followed by a directory fsync. A start after a crash in between finds
/// where it stopped: an old WAL kept beside a new one in place is removed; one with nothing in
/// place is put back and rewritten again.
pub fn upgrade_legacy_wal(wal_dir: &Path) -> Result<(), DiskError> {
    let name = wal_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "wal".into());
    let parent = wal_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let old = parent.join(format!("{name}.keel-legacy"));
    let new = parent.join(format!("{name}.etcd-format"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskError::Wal(keel_wal::Error::Io { path, source })
    };
    if old.exists() {
        if Wal::exists(wal_dir) && !keel_wal::legacy::is_legacy(wal_dir)? {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
            keel_wal::sync_dir(parent)?;
            return Ok(());
        }
        if wal_dir.exists() {
            std::fs::remove_dir_all(wal_dir).map_err(io(wal_dir))?;
        }
        std::fs::rename(&old, wal_dir).map_err(io(&old))?;
        keel_wal::sync_dir(parent)?;
    }
    if !Wal::exists(wal_dir) || !keel_wal::legacy::is_legacy(wal_dir)? {
        return Ok(());
    }
    let records = keel_wal::legacy::read(wal_dir)?;
    let identity = records
        .first()
        .filter(|r| r.kind == keel_wal::RECORD_METADATA)
        .and_then(|r| Identity::decode_legacy(&r.data))
        .ok_or_else(|| decode_err(wal_dir, "the old-format WAL does not start with its metadata record"))?;
    if new.exists() {
        std::fs::remove_dir_all(&new).map_err(io(&new))?;
    }
    let mut wal = Wal::create(&new, &identity.encode(), WalOptions::default())?;
    let (mut entries, mut states) = (0u64, 0u64);
    for r in records.iter().skip(1) {
        match r.kind {
            RECORD_ENTRY => {
                let index = crate::wire::log_entry(&r.data).map_err(|e| decode_err(wal_dir, e))?.index;
                wal.save(&[(RECORD_ENTRY, &r.data)], index + 1)?;
                entries += 1;
            }
            RECORD_STATE => {
                wal.save(&[(RECORD_STATE, &r.data)], 0)?;
                states += 1;
            }
            RECORD_SNAPSHOT if r.data.len() == 16 => {
                let term = u64::from_be_bytes(r.data[..8].try_into().unwrap_or([0; 8]));
                let index = u64::from_be_bytes(r.data[8..].try_into().unwrap_or([0; 8]));
                wal.save(&[(RECORD_SNAPSHOT, &crate::wire::wal_snapshot_record(index, term, None))], index + 1)?;
            }
            // Later metadata records repeat the first; the new WAL writes its own.
            keel_wal::RECORD_METADATA => {}
            other => return Err(decode_err(wal_dir, format!("old-format WAL record of unknown type {other}"))),
        }
    }
    drop(wal);
    std::fs::rename(wal_dir, &old).map_err(io(wal_dir))?;
    keel_wal::sync_dir(parent)?;
    std::fs::rename(&new, wal_dir).map_err(io(&new))?;
    keel_wal::sync_dir(parent)?;
    std::fs::remove_dir_all(&old).map_err(io(&old))?;
    keel_wal::sync_dir(parent)?;
    tracing::info!(wal_dir = %wal_dir.display(), entries, hard_states = states, "wal: rewrote the WAL an older Keel wrote in etcd's WAL format");
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Replay of the WAL at start: overwritten tails, gaps, entries a snapshot covers, the last
    //! hard state.
    use super::*;

    fn identity() -> Identity {
        Identity { cluster_id: 7, member_id: 1, initial_voters: vec![1] }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: format!("{index}@{term}").into_bytes().into(), ..Default::default() }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    /// A fresh WAL (no bootstrap entries) in `dir`, with `writes` saved in order, then reopened.
    fn replay(dir: &Path, writes: &[Vec<Entry>]) -> Result<Disk, DiskError> {
        let (wal, snap) = (dir.join("wal"), dir.join("snap"));
        let mut d = Disk::open(&wal, &snap, identity(), &[])?;
        for w in writes {
            d.save(None, w)?;
        }
        drop(d);
        Disk::open(&wal, &snap, identity(), &[])
    }

    fn ids(d: &Disk) -> Vec<(u64, u64)> {
        d.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn a_later_entry_replaces_the_tail_from_its_index() {
        let t = tempfile::tempdir().unwrap();
        let d = replay(t.path(), &[entries(1..=5, 1), entries(4..=6, 2)]).unwrap();
        assert_eq!(ids(&d), vec![(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]);
        assert_eq!(d.entries[3].data.as_ref(), b"4@2");
        assert!(!d.fresh);
    }

    #[test]
    fn a_rewrite_shorter_than_the_tail_drops_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let d = replay(t.path(), &[entries(1..=5, 1), vec![entry(2, 3)]]).unwrap();
        assert_eq!(ids(&d), vec![(1, 1), (2, 3)]);
    }

    #[test]
    fn a_gap_between_entries_is_refused_naming_both_indexes() {
        let t = tempfile::tempdir().unwrap();
        let err = replay(t.path(), &[entries(1..=3, 1), vec![entry(5, 1)]]).err().expect("a gap must be refused");
        assert!(err.to_string().contains("gap in WAL entries: 3 then 5"), "{err}");
    }

    #[test]
    fn entries_must_start_right_after_the_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let err = replay(t.path(), &[entries(2..=3, 1)]).err().expect("a log not starting at 1 must be refused");
        assert!(err.to_string().contains("WAL entries start at 2 but the snapshot is at 0"), "{err}");
    }

    #[test]
    fn only_a_commit_index_alone_is_written_without_waiting_for_the_disk() {
        let prev = HardState { term: 2, vote: 1, commit: 5, ..Default::default() };
        let commit = HardState { commit: 9, ..prev.clone() };
        assert!(!must_sync(&prev, Some(&commit), 0));
        assert!(!must_sync(&prev, None, 0));
        assert!(must_sync(&prev, Some(&commit), 1));
        assert!(must_sync(&prev, Some(&HardState { term: 3, ..commit.clone() }), 0));
        assert!(must_sync(&prev, Some(&HardState { vote: 2, ..commit }), 0));
    }

    #[test]
    fn a_commit_saved_without_sync_is_read_back_after_a_clean_stop() {
        let t = tempfile::tempdir().unwrap();
        let (wal, snap) = (t.path().join("wal"), t.path().join("snap"));
        let mut d = Disk::open(&wal, &snap, identity(), &[]).unwrap();
        let mut hs = HardState { term: 1, commit: 2, ..Default::default() };
        d.save_ready(Some(&hs), &entries(1..=5, 1)).unwrap();
        hs.commit = 5;
        d.save_ready(Some(&hs), &[]).unwrap();
        drop(d);
        let d = Disk::open(&wal, &snap, identity(), &[]).unwrap();
        assert_eq!(d.hard_state.commit, 5);
        assert_eq!(ids(&d).len(), 5);
    }

    #[test]
    fn entries_a_snapshot_covers_are_skipped_and_the_last_hard_state_wins() {
        let t = tempfile::tempdir().unwrap();
        let (wal, snap) = (t.path().join("wal"), t.path().join("snap"));
        let mut d = Disk::open(&wal, &snap, identity(), &[]).unwrap();
        let mut hs = HardState { term: 1, commit: 2, ..Default::default() };
        d.save(Some(&hs), &entries(1..=5, 1)).unwrap();
        d.save_snapshot(&crate::storage::snapshot_at(3, 1, Default::default(), vec![]), u64::MAX).unwrap();
        hs.commit = 5;
        hs.vote = 1;
        d.save(Some(&hs), &[]).unwrap();
        drop(d);
        let d = Disk::open(&wal, &snap, identity(), &[]).unwrap();
        assert_eq!(d.snapshot.as_ref().map(|s| s.get_metadata().index), Some(3));
        assert_eq!(ids(&d), vec![(4, 1), (5, 1)]);
        assert_eq!((d.hard_state.term, d.hard_state.commit, d.hard_state.vote), (1, 5, 1));
        assert_eq!(d.identity, identity());
    }

    #[test]
    fn a_new_cluster_starts_with_one_committed_add_per_initial_member() {
        let t = tempfile::tempdir().unwrap();
        let (wal, snap) = (t.path().join("wal"), t.path().join("snap"));
        let boot = [(1u64, b"m1".to_vec()), (2, b"m2".to_vec()), (3, b"m3".to_vec())];
        let d = Disk::open(&wal, &snap, identity(), &boot).unwrap();
        assert!(d.fresh);
        drop(d);
        let d = Disk::open(&wal, &snap, identity(), &boot).unwrap();
        assert_eq!(ids(&d), vec![(1, 1), (2, 1), (3, 1)]);
        assert_eq!(d.hard_state.commit, 3);
        for (e, (id, ctx)) in d.entries.iter().zip(&boot) {
            assert_eq!(e.get_entry_type(), EntryType::EntryConfChange);
            let cc = crate::wire::member_change(&e.data).unwrap();
            assert_eq!((cc.node_id, cc.context.as_ref()), (*id, ctx.as_slice()));
        }
    }

    /// A WAL an older Keel wrote in its own format: entries, hard state and identity survive the
    /// rewrite in etcd's format, and a rewrite cut short between its renames is finished.
    #[test]
    fn an_old_format_wal_is_rewritten_in_etcds_format_keeping_everything() {
        use keel_wal::legacy;
        let t = tempfile::tempdir().unwrap();
        let (wal, snap) = (t.path().join("wal"), t.path().join("snap"));
        std::fs::create_dir_all(&wal).unwrap();
        let id = Identity { cluster_id: 0xabc, member_id: 0x11, initial_voters: vec![0x11, 0x22, 0x33] };
        let mut b = Vec::new();
        legacy::encode(&mut b, keel_wal::RECORD_METADATA, &id.encode_legacy());
        for e in entries(1..=5, 2) {
            legacy::encode(&mut b, RECORD_ENTRY, &e.write_to_bytes().unwrap());
        }
        let hs = HardState { term: 2, vote: 0x22, commit: 4, ..Default::default() };
        legacy::encode(&mut b, RECORD_STATE, &hs.write_to_bytes().unwrap());
        b.resize(1 << 16, 0);
        std::fs::write(wal.join("0000000000000000-0000000000000000.wal"), &b).unwrap();
        for crash in [false, true] {
            if crash {
                // Cut short after the old WAL was moved aside, before the new one was in place.
                std::fs::rename(&wal, t.path().join("wal.keel-legacy")).unwrap();
                std::fs::create_dir_all(t.path().join("wal.etcd-format")).unwrap();
            }
            let d = Disk::open(&wal, &snap, identity(), &[]).unwrap();
            assert_eq!(d.identity, id);
            assert_eq!(ids(&d), vec![(1, 2), (2, 2), (3, 2), (4, 2), (5, 2)]);
            assert_eq!((d.hard_state.term, d.hard_state.vote, d.hard_state.commit), (2, 0x22, 4));
            assert!(!keel_wal::legacy::is_legacy(&wal).unwrap());
            assert!(!t.path().join("wal.keel-legacy").exists() && !t.path().join("wal.etcd-format").exists());
            drop(d);
            if !crash {
                // Put the old format back for the second round.
                std::fs::remove_dir_all(&wal).unwrap();
                std::fs::create_dir_all(&wal).unwrap();
                std::fs::write(wal.join("0000000000000000-0000000000000000.wal"), &b).unwrap();
            }
        }
    }

    #[test]
    fn the_metadata_record_is_etcds_with_keels_voters_beside() {
        let id = Identity { cluster_id: 0xcafe, member_id: 0xbeef, initial_voters: vec![0xbeef, 7] };
        let b = id.encode();
        // etcd's Metadata: NodeID field 1, ClusterID field 2.
        assert_eq!(&b[..3], &[0x08, 0xef, 0xfd]);
        assert_eq!(Identity::decode(&b), Some(id));
        let etcd_only = [0x08, 0x05, 0x10, 0x09];
        assert_eq!(Identity::decode(&etcd_only), Some(Identity { cluster_id: 9, member_id: 5, initial_voters: vec![] }));
    }
}

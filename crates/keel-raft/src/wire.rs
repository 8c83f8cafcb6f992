//! wire: the only decoder of raft's protobuf messages (`eraftpb`), for bytes from peers and disk.
//!
//! raft-rs's types are generated for the `protobuf` 2 crate, whose parser recurses without a
//! limit on nested unknown groups (RUSTSEC-2024-0437: a crafted message overflows the stack).
//! So nothing in Keel parses with it: this module mirrors `eraftpb.proto` (raft-proto 0.7) field
//! for field as `prost` messages, decodes with prost (nesting bounded, unknown fields skipped),
//! and builds raft-rs's types from the result. Encoding stays with raft-rs's types (writing is
//! not affected), except membership changes: their entries are etcd's `raftpb.ConfChange`
//! ([`MemberChange`]), whose types are numbered differently from raft-rs's. An enum value this version does not know is refused, as is any field raft
//! would read that does not decode.
//!
//! Calls nothing but prost and raft-rs's generated types; keep it in step with raft-proto's
//! `eraftpb.proto` (the round-trip tests below compare both encoders).

use bytes::Bytes;
use protobuf::ProtobufEnum;
use raft::eraftpb;

/// Why bytes did not decode as the raft message asked for.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{what}: {source}")]
    Decode { what: &'static str, source: prost::DecodeError },
    #[error("{what}: unknown enum value {value}")]
    Enum { what: &'static str, value: i32 },
    #[error("conf change does not re-encode: {0}")]
    Encode(String),
}

#[derive(Clone, PartialEq, prost::Message)]
struct PEntry {
    #[prost(int32, tag = "1")]
    entry_type: i32,
    #[prost(uint64, tag = "2")]
    term: u64,
    #[prost(uint64, tag = "3")]
    index: u64,
    #[prost(bytes = "bytes", tag = "4")]
    data: Bytes,
    #[prost(bytes = "bytes", tag = "6")]
    context: Bytes,
    #[prost(bool, tag = "5")]
    sync_log: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PConfState {
    #[prost(uint64, repeated, tag = "1")]
    voters: Vec<u64>,
    #[prost(uint64, repeated, tag = "2")]
    learners: Vec<u64>,
    #[prost(uint64, repeated, tag = "3")]
    voters_outgoing: Vec<u64>,
    #[prost(uint64, repeated, tag = "4")]
    learners_next: Vec<u64>,
    #[prost(bool, tag = "5")]
    auto_leave: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PSnapshotMetadata {
    #[prost(message, optional, tag = "1")]
    conf_state: Option<PConfState>,
    #[prost(uint64, tag = "2")]
    index: u64,
    #[prost(uint64, tag = "3")]
    term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PSnapshot {
    #[prost(bytes = "bytes", tag = "1")]
    data: Bytes,
    #[prost(message, optional, tag = "2")]
    metadata: Option<PSnapshotMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PMessage {
    #[prost(int32, tag = "1")]
    msg_type: i32,
    #[prost(uint64, tag = "2")]
    to: u64,
    #[prost(uint64, tag = "3")]
    from: u64,
    #[prost(uint64, tag = "4")]
    term: u64,
    #[prost(uint64, tag = "5")]
    log_term: u64,
    #[prost(uint64, tag = "6")]
    index: u64,
    #[prost(message, repeated, tag = "7")]
    entries: Vec<PEntry>,
    #[prost(uint64, tag = "8")]
    commit: u64,
    #[prost(uint64, tag = "15")]
    commit_term: u64,
    #[prost(message, optional, tag = "9")]
    snapshot: Option<PSnapshot>,
    #[prost(uint64, tag = "13")]
    request_snapshot: u64,
    #[prost(bool, tag = "10")]
    reject: bool,
    #[prost(uint64, tag = "11")]
    reject_hint: u64,
    #[prost(bytes = "bytes", tag = "12")]
    context: Bytes,
    #[prost(uint64, tag = "14")]
    deprecated_priority: u64,
    #[prost(int64, tag = "16")]
    priority: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PHardState {
    #[prost(uint64, tag = "1")]
    term: u64,
    #[prost(uint64, tag = "2")]
    vote: u64,
    #[prost(uint64, tag = "3")]
    commit: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PConfChange {
    #[prost(int32, tag = "2")]
    change_type: i32,
    #[prost(uint64, tag = "3")]
    node_id: u64,
    #[prost(bytes = "bytes", tag = "4")]
    context: Bytes,
    #[prost(uint64, tag = "1")]
    id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PConfChangeSingle {
    #[prost(int32, tag = "1")]
    change_type: i32,
    #[prost(uint64, tag = "2")]
    node_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PConfChangeV2 {
    #[prost(int32, tag = "1")]
    transition: i32,
    #[prost(message, repeated, tag = "2")]
    changes: Vec<PConfChangeSingle>,
    #[prost(bytes = "bytes", tag = "3")]
    context: Bytes,
}

fn decode<M: prost::Message + Default>(what: &'static str, b: &[u8]) -> Result<M, WireError> {
    M::decode(b).map_err(|source| WireError::Decode { what, source })
}

fn enum_of<E: ProtobufEnum>(what: &'static str, value: i32) -> Result<E, WireError> {
    E::from_i32(value).ok_or(WireError::Enum { what, value })
}

fn entry(p: PEntry) -> Result<eraftpb::Entry, WireError> {
    let mut e = eraftpb::Entry::default();
    e.set_entry_type(enum_of("entry type", p.entry_type)?);
    e.term = p.term;
    e.index = p.index;
    e.data = p.data;
    e.context = p.context;
    e.sync_log = p.sync_log;
    Ok(e)
}

fn conf_state(p: PConfState) -> eraftpb::ConfState {
    eraftpb::ConfState {
        voters: p.voters,
        learners: p.learners,
        voters_outgoing: p.voters_outgoing,
        learners_next: p.learners_next,
        auto_leave: p.auto_leave,
        ..Default::default()
    }
}

fn snapshot(p: PSnapshot) -> eraftpb::Snapshot {
    let mut s = eraftpb::Snapshot { data: p.data, ..Default::default() };
    if let Some(m) = p.metadata {
        let meta = s.mut_metadata();
        meta.index = m.index;
        meta.term = m.term;
        if let Some(c) = m.conf_state {
            meta.set_conf_state(conf_state(c));
        }
    }
    s
}

/// A raft message as a peer sends it.
pub fn message(b: &[u8]) -> Result<eraftpb::Message, WireError> {
    let p: PMessage = decode("raft message", b)?;
    let mut m = eraftpb::Message::default();
    m.set_msg_type(enum_of("message type", p.msg_type)?);
    m.to = p.to;
    m.from = p.from;
    m.term = p.term;
    m.log_term = p.log_term;
    m.index = p.index;
    m.set_entries(p.entries.into_iter().map(entry).collect::<Result<Vec<_>, _>>()?.into());
    m.commit = p.commit;
    m.commit_term = p.commit_term;
    if let Some(s) = p.snapshot {
        m.set_snapshot(snapshot(s));
    }
    m.request_snapshot = p.request_snapshot;
    m.reject = p.reject;
    m.reject_hint = p.reject_hint;
    m.context = p.context;
    m.deprecated_priority = p.deprecated_priority;
    m.priority = p.priority;
    if m.get_msg_type() == eraftpb::MessageType::MsgPropose {
        canonical_conf_changes(&mut m)?;
    }
    Ok(m)
}

/// raft-rs itself parses the configuration changes in a proposal (with protobuf 2): a proposal
/// from a peer has each one decoded here first and its bytes replaced by their re-encoding, which
/// holds no unknown fields, so raft-rs's parser never sees a crafted nesting.
fn canonical_conf_changes(m: &mut eraftpb::Message) -> Result<(), WireError> {
    use protobuf::Message as _;
    for e in m.mut_entries().iter_mut() {
        let bytes = match e.get_entry_type() {
            eraftpb::EntryType::EntryNormal => continue,
            // Kept in etcd's numbering (what the apply reads), not raft-rs's.
            eraftpb::EntryType::EntryConfChange => Ok(member_change(&e.data)?.encode()),
            eraftpb::EntryType::EntryConfChangeV2 => conf_change_v2(&e.data)?.write_to_bytes(),
        };
        e.data = bytes.map_err(|e| WireError::Encode(e.to_string()))?.into();
    }
    Ok(())
}

/// A log entry (a WAL record's payload).
pub fn log_entry(b: &[u8]) -> Result<eraftpb::Entry, WireError> {
    entry(decode("raft entry", b)?)
}

/// A snapshot (a `.snap` file's payload).
pub fn snapshot_of(b: &[u8]) -> Result<eraftpb::Snapshot, WireError> {
    Ok(snapshot(decode("raft snapshot", b)?))
}

/// A hard state (a WAL record's payload).
pub fn hard_state(b: &[u8]) -> Result<eraftpb::HardState, WireError> {
    let p: PHardState = decode("raft hard state", b)?;
    Ok(eraftpb::HardState { term: p.term, vote: p.vote, commit: p.commit, ..Default::default() })
}

/// etcd's `walpb.Snapshot`: the WAL record saying a snapshot was saved at (index, term) with
/// this configuration.
#[derive(Clone, PartialEq, prost::Message)]
struct PWalSnapshot {
    #[prost(uint64, tag = "1")]
    index: u64,
    #[prost(uint64, tag = "2")]
    term: u64,
    #[prost(message, optional, tag = "3")]
    conf_state: Option<PConfState>,
}

/// The WAL's snapshot record for a snapshot at (`index`, `term`) with configuration `cs`, as
/// etcd writes it (etcd's reader matches it against the `.snap` files by index and term).
pub fn wal_snapshot_record(index: u64, term: u64, cs: Option<&eraftpb::ConfState>) -> Vec<u8> {
    let conf_state = cs.map(|c| PConfState {
        voters: c.voters.clone(),
        learners: c.learners.clone(),
        voters_outgoing: c.voters_outgoing.clone(),
        learners_next: c.learners_next.clone(),
        auto_leave: c.auto_leave,
    });
    prost::Message::encode_to_vec(&PWalSnapshot { index, term, conf_state })
}

/// The (index, term) of a WAL snapshot record.
pub fn wal_snapshot_mark(b: &[u8]) -> Result<(u64, u64), WireError> {
    let p: PWalSnapshot = decode("WAL snapshot record", b)?;
    Ok((p.index, p.term))
}

/// A membership change's kind, numbered as etcd's `raftpb.ConfChangeType` (raft-rs numbers
/// learners 2 and has no update).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    AddNode,
    RemoveNode,
    /// A member's peer URLs changed: the configuration itself does not.
    UpdateNode,
    AddLearnerNode,
}

impl ChangeKind {
    fn etcd_number(self) -> i32 {
        match self {
            ChangeKind::AddNode => 0,
            ChangeKind::RemoveNode => 1,
            ChangeKind::UpdateNode => 2,
            ChangeKind::AddLearnerNode => 3,
        }
    }
}

/// The membership change an `EntryConfChange` entry carries, as etcd encodes it
/// (`raftpb.ConfChange`): the proposer's request `id`, the member, and its JSON record as
/// `context` (etcd's `membership.Member`; empty on a removal).
#[derive(Clone, Debug, PartialEq)]
pub struct MemberChange {
    pub id: u64,
    pub kind: ChangeKind,
    pub node_id: u64,
    pub context: Bytes,
}

impl MemberChange {
    /// etcd's encoding (what an etcd member's raft and apply read).
    pub fn encode(&self) -> Vec<u8> {
        use prost::Message as _;
        PConfChange { change_type: self.kind.etcd_number(), node_id: self.node_id, context: self.context.clone(), id: self.id }
            .encode_to_vec()
    }

    /// The change for raft-rs's configuration; `None` for an update, which leaves it as it is.
    pub fn to_raft(&self) -> Option<eraftpb::ConfChange> {
        let kind = match self.kind {
            ChangeKind::AddNode => eraftpb::ConfChangeType::AddNode,
            ChangeKind::RemoveNode => eraftpb::ConfChangeType::RemoveNode,
            ChangeKind::AddLearnerNode => eraftpb::ConfChangeType::AddLearnerNode,
            ChangeKind::UpdateNode => return None,
        };
        let mut c = eraftpb::ConfChange::default();
        c.set_change_type(kind);
        c.node_id = self.node_id;
        c.context = self.context.clone();
        c.id = self.id;
        Some(c)
    }
}

/// etcd's default bound on learners (`--experimental-max-learners`).
pub const MAX_LEARNERS: usize = 1;

impl MemberChange {
    /// Whether this change promotes a learner: etcd's promotion is an AddNode whose context
    /// says `"isPromote":true`; an earlier Keel build's (protobuf context) was an AddNode of a
    /// member already a learner.
    pub fn is_promote(&self, is_learner: impl Fn(u64) -> bool) -> bool {
        if self.kind != ChangeKind::AddNode {
            return false;
        }
        if is_json_record(&self.context) {
            #[derive(serde::Deserialize)]
            struct Flag {
                #[serde(rename = "isPromote", default)]
                is_promote: bool,
            }
            return serde_json::from_slice::<Flag>(&self.context).map(|f| f.is_promote).unwrap_or(false);
        }
        is_learner(self.node_id)
    }

    /// etcd's check of a committed membership change against the members before it
    /// (`ValidateConfigurationChange`): a change it refuses is applied by no member (neither to
    /// raft's configuration nor to the member list), as etcd applies an empty change instead.
    /// `member(id)`: None when `id` is no member, else whether it is a learner; `learners`: how
    /// many there are; `removed(id)`: whether `id` was removed.
    pub fn validate(
        &self,
        member: impl Fn(u64) -> Option<bool>,
        learners: usize,
        removed: impl Fn(u64) -> bool,
    ) -> Result<(), &'static str> {
        let id = self.node_id;
        if removed(id) {
            return Err("membership: ID removed");
        }
        match self.kind {
            ChangeKind::AddNode | ChangeKind::AddLearnerNode if self.is_promote(|i| member(i) == Some(true)) => match member(id) {
                None => Err("membership: ID not found"),
                Some(false) => Err("membership: can only promote a learner member"),
                Some(true) => Ok(()),
            },
            ChangeKind::AddNode | ChangeKind::AddLearnerNode => {
                if member(id).is_some() {
                    return Err("membership: ID exists");
                }
                if self.kind == ChangeKind::AddLearnerNode && learners + 1 > MAX_LEARNERS {
                    return Err("membership: too many learner members in cluster");
                }
                Ok(())
            }
            ChangeKind::RemoveNode | ChangeKind::UpdateNode => member(id).map(|_| ()).ok_or("membership: ID not found"),
        }
    }
}

/// True when a membership change's context is etcd's JSON member record (it opens with `{`);
/// earlier Keel builds wrote a protobuf record there, which never does.
pub fn is_json_record(context: &[u8]) -> bool {
    context.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{')
}

/// Decodes the membership change of an `EntryConfChange` entry: etcd's numbering, or raft-rs's
/// as earlier Keel builds wrote it. The two differ on 2 only (etcd: update, raft-rs: add
/// learner); etcd's updates carry a JSON member record, earlier Keel's learner adds a protobuf
/// one, so the context tells them apart.
pub fn member_change(b: &[u8]) -> Result<MemberChange, WireError> {
    let p: PConfChange = decode("conf change", b)?;
    let json = is_json_record(&p.context);
    let kind = match p.change_type {
        0 => ChangeKind::AddNode,
        1 => ChangeKind::RemoveNode,
        2 if json => ChangeKind::UpdateNode,
        2 | 3 => ChangeKind::AddLearnerNode,
        value => return Err(WireError::Enum { what: "conf change type", value }),
    };
    Ok(MemberChange { id: p.id, kind, node_id: p.node_id, context: p.context })
}

/// The configuration change an `EntryConfChangeV2` entry carries.
pub fn conf_change_v2(b: &[u8]) -> Result<eraftpb::ConfChangeV2, WireError> {
    let p: PConfChangeV2 = decode("conf change v2", b)?;
    let mut c = eraftpb::ConfChangeV2::default();
    c.set_transition(enum_of("conf change transition", p.transition)?);
    let mut changes = Vec::with_capacity(p.changes.len());
    for s in p.changes {
        let mut one = eraftpb::ConfChangeSingle::default();
        one.set_change_type(enum_of("conf change type", s.change_type)?);
        one.node_id = s.node_id;
        changes.push(one);
    }
    c.set_changes(changes.into());
    c.context = p.context;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use protobuf::Message as _;

    #[test]
    fn membership_changes_use_etcds_numbering() {
        let json = Bytes::from_static(br#"{"id":5,"peerURLs":["http://a:2380"]}"#);
        for (kind, n) in
            [(ChangeKind::AddNode, 0), (ChangeKind::RemoveNode, 1), (ChangeKind::UpdateNode, 2), (ChangeKind::AddLearnerNode, 3)]
        {
            let mc =
                MemberChange { id: 7, kind, node_id: 5, context: if kind == ChangeKind::RemoveNode { Bytes::new() } else { json.clone() } };
            let b = mc.encode();
            let p: PConfChange = decode("conf change", &b).unwrap();
            assert_eq!(p.change_type, n, "{kind:?}");
            assert_eq!(member_change(&b).unwrap(), mc);
        }
        // etcd's own bytes: ConfChange{ID: 7, Type: ConfChangeAddLearnerNode, NodeID: 5, Context: "{}"}.
        let etcd = [0x08, 0x07, 0x10, 0x03, 0x18, 0x05, 0x22, 0x02, b'{', b'}'];
        let mc = member_change(&etcd).unwrap();
        assert_eq!((mc.id, mc.kind, mc.node_id), (7, ChangeKind::AddLearnerNode, 5));
        assert_eq!(mc.to_raft().unwrap().get_change_type(), eraftpb::ConfChangeType::AddLearnerNode);
        assert_eq!(MemberChange { kind: ChangeKind::UpdateNode, ..mc.clone() }.to_raft(), None);
        assert!(member_change(&[0x10, 0x04]).is_err(), "no type 4");
    }

    fn sample() -> eraftpb::Message {
        let mut m = eraftpb::Message::default();
        m.set_msg_type(eraftpb::MessageType::MsgAppend);
        m.to = 2;
        m.from = 1;
        m.term = 7;
        m.log_term = 6;
        m.index = 41;
        m.commit = 40;
        m.commit_term = 6;
        m.request_snapshot = 3;
        m.reject = true;
        m.reject_hint = 9;
        m.context = Bytes::from_static(b"ctx");
        m.deprecated_priority = 4;
        m.priority = -5;
        let mut e = eraftpb::Entry::default();
        e.set_entry_type(eraftpb::EntryType::EntryConfChangeV2);
        e.term = 7;
        e.index = 42;
        e.data = Bytes::from_static(b"data");
        e.context = Bytes::from_static(b"c");
        e.sync_log = true;
        m.set_entries(vec![e.clone(), eraftpb::Entry::default()].into());
        let mut s = eraftpb::Snapshot { data: Bytes::from_static(b"snap"), ..Default::default() };
        s.mut_metadata().index = 30;
        s.mut_metadata().term = 5;
        let cs = s.mut_metadata().mut_conf_state();
        cs.voters = vec![1, 2, 3];
        cs.learners = vec![4];
        cs.voters_outgoing = vec![1, 2];
        cs.learners_next = vec![5];
        cs.auto_leave = true;
        m.set_snapshot(s);
        m
    }

    #[test]
    fn decodes_what_raft_rs_encodes() {
        let m = sample();
        let b = m.write_to_bytes().expect("encode");
        assert_eq!(message(&b).expect("decode"), m);
        let e = m.entries[0].clone();
        assert_eq!(log_entry(&e.write_to_bytes().expect("encode")).expect("decode"), e);
        let s = m.get_snapshot().clone();
        assert_eq!(snapshot_of(&s.write_to_bytes().expect("encode")).expect("decode"), s);
        let h = eraftpb::HardState { term: 3, vote: 2, commit: 1, ..Default::default() };
        assert_eq!(hard_state(&h.write_to_bytes().expect("encode")).expect("decode"), h);
        // raft-rs's encoding of a learner add (2), as earlier Keel builds proposed it.
        let mut cc = eraftpb::ConfChange::default();
        cc.set_change_type(eraftpb::ConfChangeType::AddLearnerNode);
        cc.node_id = 9;
        cc.id = 8;
        cc.context = Bytes::from_static(b"\x08\x01");
        let mc = member_change(&cc.write_to_bytes().expect("encode")).expect("decode");
        assert_eq!(mc, MemberChange { id: 8, kind: ChangeKind::AddLearnerNode, node_id: 9, context: cc.context.clone() });
        assert_eq!(mc.to_raft(), Some(cc));
        let mut v2 = eraftpb::ConfChangeV2::default();
        v2.set_transition(eraftpb::ConfChangeTransition::Explicit);
        let mut one = eraftpb::ConfChangeSingle::default();
        one.set_change_type(eraftpb::ConfChangeType::RemoveNode);
        one.node_id = 3;
        v2.set_changes(vec![one].into());
        v2.context = Bytes::from_static(b"x");
        assert_eq!(conf_change_v2(&v2.write_to_bytes().expect("encode")).expect("decode"), v2);
        // Defaults encode to nothing and decode back.
        assert_eq!(message(&[]).expect("empty"), eraftpb::Message::default());
    }

    #[test]
    fn deeply_nested_groups_are_refused_not_recursed() {
        // An unknown field 99 opening a group, a million times: the input that overflows
        // protobuf 2's parser (RUSTSEC-2024-0437).
        let open = [(99u32 << 3 | 3) as u8 | 0x80, ((99u32 << 3 | 3) >> 7) as u8];
        let b: Vec<u8> = open.iter().copied().cycle().take(2_000_000).collect();
        assert!(message(&b).is_err());
        assert!(log_entry(&b).is_err());
        assert!(conf_change_v2(&b).is_err());
    }

    #[test]
    fn proposed_conf_changes_reach_raft_re_encoded() {
        let mut cc = eraftpb::ConfChange::default();
        cc.set_change_type(eraftpb::ConfChangeType::AddNode);
        cc.node_id = 4;
        let clean = cc.write_to_bytes().expect("encode");
        // The same change with an unknown field (a group) appended.
        let mut data = clean.clone();
        data.extend_from_slice(&[0x9b, 0x06, 0x9c, 0x06]); // field 99: start group, end group
        let mut e = eraftpb::Entry::default();
        e.set_entry_type(eraftpb::EntryType::EntryConfChange);
        e.data = data.clone().into();
        let mut m = eraftpb::Message::default();
        m.set_msg_type(eraftpb::MessageType::MsgPropose);
        m.set_entries(vec![e].into());
        let got = message(&m.write_to_bytes().expect("encode")).expect("decode");
        assert_eq!(&got.entries[0].data[..], &clean[..]);
        // Other messages keep the bytes as sent (the log's bytes are the leader's).
        m.set_msg_type(eraftpb::MessageType::MsgAppend);
        let got = message(&m.write_to_bytes().expect("encode")).expect("decode");
        assert_eq!(&got.entries[0].data[..], &data[..]);
        // A proposal whose change does not decode is refused whole.
        m.set_msg_type(eraftpb::MessageType::MsgPropose);
        m.mut_entries()[0].data = vec![0x0a, 0xff].into();
        assert!(message(&m.write_to_bytes().expect("encode")).is_err());
    }

    #[test]
    fn unknown_enum_values_and_garbage_are_errors() {
        let m = PMessage { msg_type: 99, ..Default::default() };
        assert!(matches!(message(&m.encode_to_vec()), Err(WireError::Enum { value: 99, .. })));
        let e = PEntry { entry_type: 3, ..Default::default() };
        assert!(log_entry(&e.encode_to_vec()).is_err());
        assert!(message(&[0x0a, 0xff]).is_err());
        // Unknown fields are skipped, as protobuf does.
        let mut b = sample().write_to_bytes().expect("encode");
        b.extend_from_slice(&[0xa0, 0x06, 0x01]); // field 100, varint 1
        assert_eq!(message(&b).expect("decode"), sample());
    }
}

#[cfg(test)]
mod validation_tests {
    use super::*;

    fn change(kind: ChangeKind, node_id: u64, context: &str) -> MemberChange {
        MemberChange { id: 1, kind, node_id, context: Bytes::copy_from_slice(context.as_bytes()) }
    }

    #[test]
    fn membership_changes_are_checked_as_etcd_checks_them() {
        // Members: 1 (voter), 2 (learner); 9 was removed.
        let member = |id: u64| match id {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        };
        let check = |c: &MemberChange| c.validate(member, 1, |id| id == 9);
        // etcd's promotion context, as etcd 3.6 writes it.
        let promote = |id| change(ChangeKind::AddNode, id, &format!(r#"{{"id":{id},"peerURLs":null,"isPromote":true}}"#));
        assert_eq!(check(&promote(2)), Ok(()));
        assert_eq!(check(&promote(1)), Err("membership: can only promote a learner member"));
        assert_eq!(check(&promote(5)), Err("membership: ID not found"));
        // An add of a member already there, not a promotion: refused (etcd's ErrIDExists).
        assert_eq!(check(&change(ChangeKind::AddNode, 2, r#"{"id":2,"peerURLs":["http://a"]}"#)), Err("membership: ID exists"));
        assert_eq!(check(&change(ChangeKind::AddNode, 5, r#"{"id":5,"peerURLs":["http://b"]}"#)), Ok(()));
        // A second learner with etcd's default bound of one.
        let learner = change(ChangeKind::AddLearnerNode, 6, r#"{"id":6,"peerURLs":["http://c"],"isLearner":true}"#);
        assert_eq!(check(&learner), Err("membership: too many learner members in cluster"));
        assert_eq!(learner.validate(member, 0, |_| false), Ok(()));
        assert_eq!(check(&change(ChangeKind::RemoveNode, 5, "")), Err("membership: ID not found"));
        assert_eq!(check(&change(ChangeKind::RemoveNode, 9, "")), Err("membership: ID removed"));
        assert_eq!(check(&change(ChangeKind::RemoveNode, 1, "")), Ok(()));
        // An earlier Keel build's promotion: AddNode of a learner with a protobuf record.
        assert!(change(ChangeKind::AddNode, 2, "\x08\x02").is_promote(|id| id == 2));
    }
}

//! wire: the only decoder of raft's protobuf messages (`eraftpb`), for bytes from peers and disk.
//!
//! raft-rs's types are generated for the `protobuf` 2 crate, whose parser recurses without a
//! limit on nested unknown groups (RUSTSEC-2024-0437: a crafted message overflows the stack).
//! So nothing in Keel parses with it: this module mirrors `eraftpb.proto` (raft-proto 0.7) field
//! for field as `prost` messages, decodes with prost (nesting bounded, unknown fields skipped),
//! and builds raft-rs's types from the result. Encoding stays with raft-rs's types (writing is
//! not affected). An enum value this version does not know is refused, as is any field raft
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
            eraftpb::EntryType::EntryConfChange => conf_change(&e.data)?.write_to_bytes(),
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

/// The configuration change an `EntryConfChange` entry carries.
pub fn conf_change(b: &[u8]) -> Result<eraftpb::ConfChange, WireError> {
    let p: PConfChange = decode("conf change", b)?;
    let mut c = eraftpb::ConfChange::default();
    c.set_change_type(enum_of("conf change type", p.change_type)?);
    c.node_id = p.node_id;
    c.context = p.context;
    c.id = p.id;
    Ok(c)
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
        let mut cc = eraftpb::ConfChange::default();
        cc.set_change_type(eraftpb::ConfChangeType::AddLearnerNode);
        cc.node_id = 9;
        cc.id = 8;
        cc.context = Bytes::from_static(b"peer urls");
        assert_eq!(conf_change(&cc.write_to_bytes().expect("encode")).expect("decode"), cc);
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

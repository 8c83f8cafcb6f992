//! keel_raft::wire, the decoder of raft messages from peers, on arbitrary bytes: no panic, no
//! stack overflow (protobuf 2's parser overflows on nested groups, RUSTSEC-2024-0437), and what
//! it accepts encodes back (with raft-rs's encoder, or etcd's for membership changes) to bytes it
//! decodes to the same message.
#![no_main]
use keel_raft::ProtoMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = keel_raft::wire::message(data) {
        let again = m.write_to_bytes().expect("encode");
        assert_eq!(keel_raft::wire::message(&again).expect("decode again"), m);
    }
    if let Ok(e) = keel_raft::wire::log_entry(data) {
        assert_eq!(keel_raft::wire::log_entry(&e.write_to_bytes().expect("encode")).expect("decode again"), e);
    }
    let _ = keel_raft::wire::snapshot_of(data);
    let _ = keel_raft::wire::hard_state(data);
    // Membership changes: what decodes encodes back (etcd's encoding) to the same change
    // (earlier Keel's learner add, raft-rs's 2, comes back as etcd's 3).
    if let Ok(c) = keel_raft::wire::member_change(data) {
        let again = keel_raft::wire::member_change(&c.encode()).expect("decode again");
        assert_eq!(again, c);
    }
    let _ = keel_raft::wire::conf_change_v2(data);
});

//! etcd's KV semantics on arbitrary requests (Put, DeleteRange, Txn, Range decoded from the
//! input): no panic, and a request that fails changes nothing (the revision stays).
#![no_main]
use keel_mvcc::kv::{self, NoLeases};
use keel_mvcc::Store;
use keel_proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(&dir.path().join("db")).expect("store");
    let mut rest = data;
    // Requests: [kind u8][len u16][protobuf] ...
    while rest.len() >= 3 {
        let kind = rest[0] % 4;
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let end = (3 + len).min(rest.len());
        let body = &rest[3..end];
        rest = &rest[end..];
        let before = store.current_rev();
        let failed = match kind {
            0 => PutRequest::decode(body).ok().map(|r| {
                let mut w = store.write();
                let res = kv::put(&mut w, &r, &NoLeases);
                w.finish();
                res.is_err()
            }),
            1 => DeleteRangeRequest::decode(body).ok().map(|r| {
                let mut w = store.write();
                let res = kv::delete_range(&mut w, &r);
                w.finish();
                res.is_err()
            }),
            2 => TxnRequest::decode(body).ok().map(|r| {
                let mut w = store.write();
                let res = kv::txn(&mut w, &r, &NoLeases);
                w.finish();
                res.is_err()
            }),
            _ => RangeRequest::decode(body).ok().map(|r| {
                let _ = kv::range(&store, &r);
                false
            }),
        };
        if failed == Some(true) {
            assert_eq!(store.current_rev(), before, "a failed request changed the revision");
        }
        assert!(store.current_rev() >= before, "revision went backwards");
    }
});

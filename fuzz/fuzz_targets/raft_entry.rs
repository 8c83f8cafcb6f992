//! `keel_server::entry::decode`, the decoder of every committed request (etcd's
//! InternalRaftRequest, earlier Keel's encoding) on arbitrary bytes: no panic, and what it
//! accepts in etcd's form encodes back to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = keel_server::entry::decode(data) {
        let who = d.who.clone().unwrap_or_default();
        let again = keel_server::entry::decode(&keel_server::entry::encode(d.id, &who, d.request.clone())).expect("decode again");
        assert_eq!((again.id, again.request), (d.id, d.request));
    }
});

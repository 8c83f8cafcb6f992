//! Restoring a store from a backend holding arbitrary key records (revision keys and encoded
//! key-values, as found on disk): the store opens or reports corruption, never panics.
#![no_main]
use keel_mvcc::backend::{Backend, Meta};
use keel_mvcc::Store;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let mut changes: keel_mvcc::backend::Changes = BTreeMap::new();
    let mut rest = data;
    // Records: [key len u8][key][value len u16][value] ...
    while rest.len() >= 3 {
        let kl = rest[0] as usize;
        let Some(key) = rest.get(1..1 + kl) else { break };
        let Some(vl) = rest.get(1 + kl..3 + kl) else { break };
        let vl = u16::from_le_bytes([vl[0], vl[1]]) as usize;
        let end = (3 + kl + vl).min(rest.len());
        changes.insert(key.to_vec(), Some(std::sync::Arc::from(&rest[3 + kl..end])));
        rest = &rest[end..];
    }
    let meta = Meta { consistent_index: 7, term: 2, current_rev: data.first().copied().unwrap_or(0) as i64, compacted_rev: 0 };
    {
        let b = Backend::open(&path).expect("backend");
        b.commit(&changes, &BTreeMap::new(), &meta).expect("commit");
    }
    if let Ok(store) = Store::open(&path) {
        assert!(store.current_rev() >= store.compacted_rev());
    }
});

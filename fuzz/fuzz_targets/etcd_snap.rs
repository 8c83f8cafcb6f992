//! etcd's `.snap` reader (snappb, raftpb.Snapshot, the v2 store's JSON) on an arbitrary file:
//! an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("0000000000000002-0000000000000010.snap");
    std::fs::write(&p, data).expect("write");
    let _ = keel_migrate::snap::read(&p);
});

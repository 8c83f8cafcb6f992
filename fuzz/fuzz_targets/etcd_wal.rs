//! etcd's WAL reader (and the translation of the requests in it) on an arbitrary segment: an
//! error naming the file and offset, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("0000000000000000-0000000000000000.wal"), data).expect("write");
    if let Ok(log) = keel_migrate::wal::read(dir.path()) {
        for e in log.entries {
            let _ = keel_migrate::request::translate(&e.data);
        }
    }
});

//! The WAL reader on an arbitrary segment file: it opens (repairing only a torn tail) or reports
//! corruption; it never panics, and whatever it accepts it accepts again after its own repair.
//! The read-only reader and the reader of Keel's older format take the same bytes first.
#![no_main]
use keel_wal::{Wal, WalOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).expect("mkdir");
    std::fs::write(wal.join("0000000000000000-0000000000000000.wal"), data).expect("write");
    let _ = keel_wal::legacy::read(&wal);
    let read = Wal::read(&wal).map(|r| r.len());
    let opts = WalOptions { segment_bytes: 64 * 1024 };
    if let Ok((w, records)) = Wal::open(&wal, opts.clone()) {
        drop(w);
        let (_, again) = Wal::open(&wal, opts).expect("a repaired WAL opens again");
        assert_eq!(records.len(), again.len(), "reopening a repaired WAL changed what it holds");
        if let Ok(n) = read {
            assert_eq!(n, records.len(), "the read-only reader and the opening one disagree");
        }
    }
});

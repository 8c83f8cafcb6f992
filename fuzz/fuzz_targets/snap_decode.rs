//! The snapshot loader on an arbitrary .snap file: a CRC mismatch or a short file is an error,
//! never a panic.
#![no_main]
use keel_wal::Snapshotter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("0000000000000002-0000000000000010.snap"), data).expect("write");
    let s = Snapshotter::new(dir.path()).expect("snapshotter");
    if let Ok(Some(f)) = s.load_newest() {
        // Accepted data must carry a matching checksum.
        assert!(data.len() >= 4);
        assert_eq!(crc32c::crc32c(&data[4..]).to_le_bytes(), data[..4], "accepted a snapshot whose CRC does not match");
        let _ = f;
    }
});

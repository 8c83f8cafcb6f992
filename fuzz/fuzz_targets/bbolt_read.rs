//! The bbolt reader on arbitrary bytes: every bucket walked; damage is an error, never a panic,
//! a hang or an allocation beyond the input's size.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(db) = keel_bbolt::Db::from_bytes("fuzz", data.to_vec()) else { return };
    let Ok(names) = db.buckets() else { return };
    for n in names {
        let _ = db.for_each(&n, &mut |_, _| Ok(()));
    }
});

//! What loading a received snapshot costs (the learner's loader): N records (1 KiB values unless told) in
//! batches of 10,000 (unless told) into a new backend through `Backend::load`, each synced.
//!
//! `cargo run --release -p keel-mvcc --example load_cost -- N [DIR [BATCH [VALUE_BYTES]]]`

use keel_mvcc::backend::{Backend, Meta, TABLE_KEYS};
use keel_mvcc::Revision;
use keel_proto::mvccpb::KeyValue;
use prost::Message;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: i64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let per_batch: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10_000);
    let dir = args.get(2).cloned().unwrap_or_else(|| "/tmp/load_cost".into());
    std::fs::create_dir_all(&dir)?;
    let path = std::path::Path::new(&dir).join("db");
    let _ = std::fs::remove_file(&path);
    let b = Backend::open(&path)?;
    let size: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let value = vec![7u8; size];
    let t0 = Instant::now();
    let mut gen = 0.0;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let g = Instant::now();
        let kv = KeyValue {
            key: format!("/registry/pods/default/pod-{i:012}").into_bytes(),
            create_revision: i + 2,
            mod_revision: i + 2,
            version: 1,
            value: value.clone(),
            lease: 0,
        };
        batch.push((TABLE_KEYS, Revision::new(i + 2, 0).to_key(false), kv.encode_to_vec()));
        gen += g.elapsed().as_secs_f64();
        if batch.len() == per_batch {
            b.load(&batch, None)?;
            batch.clear();
        }
    }
    let meta = Meta { consistent_index: 1, term: 1, current_rev: n + 1, compacted_rev: 0 };
    let last = Instant::now();
    b.load(&batch, Some(&meta))?;
    println!("last batch: {:.2} s", last.elapsed().as_secs_f64());
    let s = t0.elapsed().as_secs_f64() - gen;
    // What the loader wrote: bytes passed to write calls, and bytes that reached the disk.
    if let Ok(io) = std::fs::read_to_string("/proc/self/io") {
        let field = |name: &str| io.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().parse::<u64>().unwrap_or(0) >> 20);
        println!("written: {:?} MiB by write calls, {:?} MiB to the disk", field("wchar:"), field("write_bytes:"));
    }
    drop(b);
    let db = redb::Database::open(&path)?;
    let st = db.begin_write()?.stats()?;
    println!(
        "leaf pages {} branch pages {} stored {} MiB metadata {} MiB fragmented {} MiB",
        st.leaf_pages(),
        st.branch_pages(),
        st.stored_bytes() >> 20,
        st.metadata_bytes() >> 20,
        st.fragmented_bytes() >> 20
    );
    println!(
        "{n} records in {s:.2} s (generation {gen:.2} s excluded): {:.0} records/s, file {} MiB",
        n as f64 / s,
        std::fs::metadata(&path)?.len() >> 20
    );
    Ok(())
}

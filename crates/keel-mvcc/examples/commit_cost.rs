//! What redb's quick repair costs a commit as the file grows: a file of N records of 1 KiB
//! (loaded in 4 MiB transactions, not recorded), then COMMITS small synced transactions of 10
//! records each, with quick repair (the allocator state recorded in each commit, as the
//! backend's commits do) and without, alternating in rounds; prints per commit the time and
//! the bytes that reached the disk (`/proc/self/io`).
//!
//! `cargo run --release -p keel-mvcc --example commit_cost -- N [COMMITS [DIR]]`

use redb::{Database, TableDefinition};
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key");

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| io.lines().find_map(|l| l.strip_prefix("write_bytes:").map(|v| v.trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let commits: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let dir = args.get(3).cloned().unwrap_or_else(|| "/tmp/commit_cost".into());
    std::fs::create_dir_all(&dir)?;
    let path = std::path::Path::new(&dir).join("db");
    let _ = std::fs::remove_file(&path);
    let db = Database::builder().set_cache_size(64 << 20).create(&path)?;
    let value = vec![7u8; 1024];
    let mut next = 0u64;
    let put = |db: &Database, next: &mut u64, count: u64, quick: bool, durable: bool| -> Result<(), Error> {
        let mut tx = db.begin_write()?;
        tx.set_quick_repair(quick);
        if !durable {
            tx.set_durability(redb::Durability::None)?;
        }
        {
            let mut t = tx.open_table(KEYS)?;
            for _ in 0..count {
                t.insert(next.to_be_bytes().as_slice(), value.as_slice())?;
                *next += 1;
            }
        }
        tx.commit()?;
        Ok(())
    };
    let t0 = Instant::now();
    while next < n {
        let last = next + 4000 >= n;
        let count = 4000.min(n - next);
        put(&db, &mut next, count, last, last)?;
    }
    println!("loaded {n} records in {:.1} s, file {} MiB", t0.elapsed().as_secs_f64(), std::fs::metadata(&path)?.len() >> 20);
    let rounds = 4;
    let mut totals = [(0f64, 0u64); 2];
    for _ in 0..rounds {
        for (i, quick) in [true, false].into_iter().enumerate() {
            let w0 = write_bytes();
            let t = Instant::now();
            for _ in 0..commits / rounds {
                put(&db, &mut next, 10, quick, true)?;
            }
            totals[i].0 += t.elapsed().as_secs_f64();
            totals[i].1 += write_bytes() - w0;
        }
    }
    for (i, name) in ["quick repair", "no quick repair"].iter().enumerate() {
        let per = (commits / rounds * rounds) as f64;
        println!(
            "{name:>16}: {:.3} ms and {:.1} KiB to the disk per commit",
            totals[i].0 * 1000.0 / per,
            totals[i].1 as f64 / 1024.0 / per
        );
    }
    Ok(())
}

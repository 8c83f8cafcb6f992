//! What a key index kept in the backend costs the write path (PERFORMANCE.md, run 9's probe):
//! records of 1 KiB written in transactions of BATCH into a redb file as Keel's backend opens
//! it (64 MiB cache, quick repair), with, besides each record,
//!
//! - `rev`: an index row keyed by the record's revision (what Keel writes now: appends);
//! - `bykey`: the key's history in a table keyed by user key, read and written back in the same
//!   transaction (a random leaf page copied per key);
//! - `merge`: the row by revision, and the changed histories kept in memory and merged into the
//!   by-key table every MERGE changes, in transactions of 50,000 keys.
//!
//! First N records of new keys, then N/2 updates of random existing keys; prints records per
//! second of each phase.
//!
//! `cargo run --release -p keel-mvcc --example index_write_cost -- MODE N BATCH [MERGE] [DIR]`

use redb::{Database, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key");
const KEY_INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key_index");
const BY_KEY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("key_by_key");

/// The user key of record number `i`: a permutation of 0..2^40, shaped like a Kubernetes key.
fn user_key(i: u64) -> Vec<u8> {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & ((1 << 40) - 1);
    format!("/registry/pods/default/pod-{x:012x}").into_bytes()
}

struct Probe {
    db: Database,
    mode: String,
    batch: u64,
    merge_every: usize,
    rev: u64,
    /// `merge`: the histories changed since the last merge (revisions appended).
    layer: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Probe {
    /// Writes `total` records, the `n`th of user key number `pick(n)`; returns records/s.
    fn phase(&mut self, total: u64, pick: impl Fn(u64) -> u64) -> Result<f64, Error> {
        let t0 = Instant::now();
        let value = vec![7u8; 1024];
        let mut done = 0;
        while done < total {
            let mut tx = self.db.begin_write()?;
            tx.set_quick_repair(true);
            {
                let mut keys = tx.open_table(KEYS)?;
                let mut rows = tx.open_table(KEY_INDEX)?;
                let mut by_key = tx.open_table(BY_KEY)?;
                for _ in 0..self.batch.min(total - done) {
                    let key = user_key(pick(done));
                    let rk = self.rev.to_be_bytes();
                    keys.insert(&rk[..], &value[..])?;
                    // A change as the index keeps it: revision, sub, size and tombstone mark.
                    let mut change = rk.to_vec();
                    change.extend_from_slice(&[0u8; 8]);
                    match self.mode.as_str() {
                        "rev" | "merge" => {
                            let mut row = key.clone();
                            row.extend_from_slice(&[0u8; 29]);
                            rows.insert(&rk[..], &row[..])?;
                            if self.mode == "merge" {
                                self.layer.entry(key).or_default().extend_from_slice(&change);
                            }
                        }
                        "bykey" => {
                            let mut h = by_key.get(&key[..])?.map(|g| g.value().to_vec()).unwrap_or_else(|| vec![0u8; 24]);
                            h.extend_from_slice(&change);
                            by_key.insert(&key[..], &h[..])?;
                        }
                        other => return Err(format!("unknown mode {other}").into()),
                    }
                    self.rev += 1;
                    done += 1;
                }
            }
            tx.commit()?;
            if self.mode == "merge" && self.layer.len() >= self.merge_every {
                self.merge()?;
            }
        }
        Ok(total as f64 / t0.elapsed().as_secs_f64())
    }

    /// Merges the changed histories into the by-key table, in key order.
    fn merge(&mut self) -> Result<(), Error> {
        let layer = std::mem::take(&mut self.layer);
        let mut it = layer.into_iter().peekable();
        while it.peek().is_some() {
            let mut tx = self.db.begin_write()?;
            tx.set_quick_repair(true);
            {
                let mut by_key = tx.open_table(BY_KEY)?;
                for (k, changes) in it.by_ref().take(50_000) {
                    let mut h = by_key.get(&k[..])?.map(|g| g.value().to_vec()).unwrap_or_else(|| vec![0u8; 24]);
                    h.extend_from_slice(&changes);
                    by_key.insert(&k[..], &h[..])?;
                }
            }
            tx.commit()?;
        }
        Ok(())
    }
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: index_write_cost MODE N BATCH [MERGE] [DIR]".into());
    }
    let n: u64 = args[2].parse()?;
    let batch: u64 = args[3].parse()?;
    let merge_every: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(500_000);
    let dir = tempfile::tempdir_in(args.get(5).map(String::as_str).unwrap_or("."))?;
    let db = Database::builder().set_cache_size(64 << 20).create(dir.path().join("db"))?;
    let mut p = Probe { db, mode: args[1].clone(), batch: batch.max(1), merge_every, rev: 1, layer: BTreeMap::new() };
    let load = p.phase(n, |i| i)?;
    let updates = p.phase(n / 2, |i| (i.wrapping_mul(2_654_435_761) ^ 0x5bd1_e995) % n.max(1))?;
    println!("{}: load {load:.0} records/s, updates {updates:.0} records/s", p.mode);
    Ok(())
}

//! What a WAL's fdatasync waits for while another file on the same disk is written: a
//! segment preallocated with `fallocate` (unwritten extents: each append converts a part of
//! one, a metadata change, so each fdatasync commits the filesystem's journal and, on ext4 in
//! `data=ordered` mode, waits for the other files' newly allocated data) against one whose
//! blocks were written with zeros beforehand (an append then changes no metadata).
//!
//! A WAL thread appends RECORD bytes and fdatasyncs, every INTERVAL_US; a background writer
//! grows a sparse file by 4 KiB pages written at its end and at random offsets (as a B-tree
//! file grows) and fdatasyncs it every 100 ms. The two preallocations alternate in ROUNDS;
//! each round prints the fdatasync latencies' p50, p99 and maximum. Run with the disk otherwise
//! idle.
//!
//! With MB_PER_S `read`, the background instead reads a file of 4 GiB not in the page cache
//! (written, synced, then dropped from the cache), 4 KiB at a time in order, as a
//! defragment's copy reads a cold backend; a round without it is printed first.
//! `COLD_READ_BYTES` (4096) sets the size of each read, `COLD_READ_MB_PER_S` (0: unpaced) a pace.
//!
//! `cargo run --release -p keel-wal --example fsync_contention -- [ROUNDS [SYNCS [DIR [MB_PER_S|read]]]]`

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

const SEGMENT: u64 = 64 << 20;
const RECORD: usize = 300;
const INTERVAL_US: u64 = 2_000;

fn fallocate(f: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an open descriptor owned by `f`; no memory is shared.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn segment(path: &std::path::Path, zeroed: bool) -> Result<File, Error> {
    let _ = std::fs::remove_file(path);
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    if zeroed {
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..SEGMENT / chunk.len() as u64 {
            f.write_all(&chunk)?;
        }
    } else {
        fallocate(&f, SEGMENT)?;
    }
    f.sync_all()?;
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

/// Writes `mb_per_s` of 4 KiB pages to a growing sparse file, half at its end and half at
/// random offsets below it, and fdatasyncs it every 100 ms, until `stop`.
fn background(path: std::path::PathBuf, mb_per_s: u64, stop: Arc<AtomicBool>) -> Result<(), std::io::Error> {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    let page = vec![0x5au8; 4096];
    let pages_per_tick = (mb_per_s << 20) / 4096 / 10;
    let mut end = 0u64;
    let mut len = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Relaxed) {
        let tick = Instant::now();
        for i in 0..pages_per_tick {
            let at = if i % 2 == 0 || end == 0 {
                end += 4096;
                end - 4096
            } else {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % (end / 4096)) * 4096
            };
            if end > len {
                len = (end * 2).max(64 << 20);
                f.set_len(len)?;
            }
            f.write_all_at(&page, at)?;
        }
        f.sync_data()?;
        if let Some(rest) = Duration::from_millis(100).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    drop(f);
    std::fs::remove_file(&path)
}

/// Reads `path` `size` bytes at a time from its start, over and over, at most `mb_per_s` a
/// second (0: as fast as it can), dropping what was read from the page cache, until `stop`.
fn cold_reader(path: std::path::PathBuf, size: usize, mb_per_s: u64, stop: Arc<AtomicBool>) -> Result<(), std::io::Error> {
    use std::os::fd::AsRawFd;
    let f = File::open(&path)?;
    let len = f.metadata()?.len();
    let mut page = vec![0u8; size];
    let mut at = 0u64;
    let started = Instant::now();
    let mut read = 0u64;
    while !stop.load(Ordering::Relaxed) {
        f.read_exact_at(&mut page, at)?;
        read += size as u64;
        at = (at + size as u64) % len;
        if mb_per_s > 0 {
            let due = Duration::from_secs_f64(read as f64 / (mb_per_s << 20) as f64);
            if let Some(rest) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        if at.is_multiple_of(64 << 20) {
            // SAFETY: posix_fadvise on an open descriptor owned by `f`; no memory is shared.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    Ok(())
}

fn cold_file(path: &std::path::Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    let chunk = vec![0x3cu8; 4 << 20];
    for _ in 0..1024 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    // SAFETY: posix_fadvise on an open descriptor owned by `f`; no memory is shared.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

fn wal_round(dir: &std::path::Path, zeroed: bool, syncs: usize) -> Result<Vec<Duration>, Error> {
    let mut wal = segment(&dir.join("wal"), zeroed)?;
    let record = vec![0xa5u8; RECORD];
    let mut lat = Vec::with_capacity(syncs);
    for _ in 0..syncs {
        let t = Instant::now();
        wal.write_all(&record)?;
        wal.sync_data()?;
        let took = t.elapsed();
        lat.push(took);
        if let Some(rest) = Duration::from_micros(INTERVAL_US).checked_sub(took) {
            std::thread::sleep(rest);
        }
    }
    lat.sort();
    Ok(lat)
}

fn report(round: usize, what: &str, lat: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "round {round} {what:>12}: fdatasync p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() * 99 / 100]),
        ms(lat[lat.len() - 1])
    );
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let syncs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3000);
    let dir = std::path::PathBuf::from(args.get(3).cloned().unwrap_or_else(|| "/tmp/fsync_contention".into()));
    let read = args.get(4).is_some_and(|a| a == "read");
    let mb_per_s: u64 = if read { 0 } else { args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(40) };
    std::fs::create_dir_all(&dir)?;
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (read_size, read_rate) = (env("COLD_READ_BYTES", 4096) as usize, env("COLD_READ_MB_PER_S", 0));
    if read {
        cold_file(&dir.join("cold"))?;
    }
    for round in 0..rounds {
        if read {
            report(round, "alone", &wal_round(&dir, false, syncs)?);
            let stop = Arc::new(AtomicBool::new(false));
            let bg = {
                let (path, stop) = (dir.join("cold"), stop.clone());
                std::thread::spawn(move || cold_reader(path, read_size, read_rate, stop))
            };
            let lat = wal_round(&dir, false, syncs);
            stop.store(true, Ordering::Relaxed);
            bg.join().map_err(|_| "background reader panicked")??;
            report(round, "cold reads", &lat?);
            continue;
        }
        for zeroed in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let bg = {
                let (path, stop) = (dir.join("backend"), stop.clone());
                std::thread::spawn(move || background(path, mb_per_s, stop))
            };
            let lat = wal_round(&dir, zeroed, syncs);
            stop.store(true, Ordering::Relaxed);
            bg.join().map_err(|_| "background writer panicked")??;
            report(round, if zeroed { "zeroed" } else { "fallocate" }, &lat?);
        }
    }
    Ok(())
}

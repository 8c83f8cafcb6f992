//! What a WAL's appends wait for while a defragmentation runs on the same disk: a thread
//! appends 300 bytes to a file and fdatasyncs it every 2 ms (a WAL under a steady writer) while
//! the main thread defragments a backend of N records of 1 KiB, as `Server::defragment` does:
//! `Backend::copy_to`, `Backend::pages_in_use` of the copy, then the swap (retire, rename, drop
//! the old file, whose blocks `keel_reclaim` gives back in steps), then 10 s more.
//!
//! The backend is built once in DIR (kept for later runs of the same N): N records, then the
//! older half of them deleted, as a compaction of half the revisions leaves a file; each run
//! works on a copy of it. With `DROP_CACHES=1` the page cache is dropped before the copy (as
//! root), so the copy reads a cold file as a member's defragment does at 5 GB. With
//! `IOPRIO_IDLE=1` the copying thread runs at the idle I/O priority class (it changed nothing
//! here: PERFORMANCE.md run 16).
//!
//! Prints, per phase, the appends' `write` and `fdatasync` latencies (p50, p99, max; syncs over
//! 10 ms) and the twelve slowest appends with the phase and the time into it; the copy's own
//! steps are printed as they happen (tracing at debug).
//!
//! `cargo run --release -p keel-mvcc --example defrag_contention -- N DIR`

use keel_mvcc::backend::{Backend, Meta, TABLE_KEYS};
use keel_mvcc::Revision;
use keel_proto::mvccpb::KeyValue;
use prost::Message;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

const PHASES: [&str; 5] = ["before", "copy", "pages in use", "swap and close", "after"];

fn build(path: &std::path::Path, n: i64) -> Result<(), Error> {
    let b = Backend::open(path)?;
    let value = vec![7u8; 1024];
    let mut batch = Vec::with_capacity(10_000);
    // Two revisions of every even key: the older is what a compaction would remove.
    let record = |i: i64, rev: i64| {
        let kv = KeyValue {
            key: format!("/registry/pods/default/pod-{:012}", i / 2).into_bytes(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            value: value.clone(),
            lease: 0,
        };
        (TABLE_KEYS, Revision::new(rev, 0).to_key(false), kv.encode_to_vec())
    };
    for i in 0..n {
        batch.push(record(i, i + 2));
        if batch.len() == 10_000 {
            b.load(&batch, None)?;
            batch.clear();
        }
    }
    let meta = Meta { consistent_index: 1, term: 1, current_rev: n + 1, compacted_rev: 0 };
    b.load(&batch, Some(&meta))?;
    // Half the revisions go, as a compaction of half of them leaves the file.
    let mut stale = keel_mvcc::backend::Changes::new();
    for i in (0..n).step_by(2) {
        stale.insert(Revision::new(i + 2, 0).to_key(false), None);
        if stale.len() == 10_000 {
            b.commit(&stale, &Default::default(), &meta)?;
            stale.clear();
        }
    }
    b.commit(&stale, &Default::default(), &meta)?;
    Ok(())
}

struct Append {
    at: Duration,
    phase: usize,
    write: Duration,
    sync: Duration,
}

/// The `p` quantile of `v`, which is sorted, in ms (0 when empty).
fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("keel_mvcc=debug,keel_reclaim=debug"))
        .with_target(false)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let n: i64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let dir = std::path::PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "/tmp/defrag_contention".into()));
    std::fs::create_dir_all(&dir)?;
    let built = dir.join(format!("built-{n}.db"));
    if !built.exists() {
        let t = Instant::now();
        let staged = dir.join("building.db");
        let _ = std::fs::remove_file(&staged);
        build(&staged, n)?;
        std::fs::rename(&staged, &built)?;
        println!("built {n} records in {:.1} s", t.elapsed().as_secs_f64());
    }
    let src = dir.join("member.db");
    let _ = std::fs::remove_file(&src);
    let st = std::process::Command::new("cp").arg("--sparse=always").arg(&built).arg(&src).status()?;
    if !st.success() {
        return Err("cp failed".into());
    }
    let old = Backend::open(&src)?;
    println!("backend {} MiB", old.size() >> 20);
    if std::env::var("DROP_CACHES").as_deref() == Ok("1") {
        std::process::Command::new("sync").status()?;
        std::fs::write("/proc/sys/vm/drop_caches", "1")?;
        println!("page cache dropped");
    }

    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let appends = Arc::new(Mutex::new(Vec::<Append>::new()));
    let t0 = Instant::now();
    let wal = {
        let (phase, stop, appends) = (phase.clone(), stop.clone(), appends.clone());
        let path = dir.join("wal");
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(path)?;
            let rec = [5u8; 300];
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let a = Instant::now();
                f.write_all(&rec)?;
                let w = a.elapsed();
                f.sync_data()?;
                let s = a.elapsed() - w;
                let at = a.duration_since(t0);
                if let Ok(mut v) = appends.lock() {
                    v.push(Append { at, phase: phase.load(Ordering::Relaxed), write: w, sync: s });
                }
                next += Duration::from_millis(2);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                } else {
                    next = Instant::now();
                }
            }
            Ok(())
        })
    };
    let mut starts = vec![Duration::ZERO; PHASES.len()];
    let mut enter = |p: usize| {
        starts[p] = t0.elapsed();
        phase.store(p, Ordering::Relaxed);
        println!("{:>8.3} s  {}", starts[p].as_secs_f64(), PHASES[p]);
    };
    std::thread::sleep(Duration::from_secs(5));
    if std::env::var("IOPRIO_IDLE").as_deref() == Ok("1") {
        // IOPRIO_WHO_PROCESS of this thread, IOPRIO_CLASS_IDLE (3) << IOPRIO_CLASS_SHIFT (13).
        // SAFETY: a syscall taking integers only.
        let r = unsafe { libc::syscall(libc::SYS_ioprio_set, 1, libc::gettid(), 3 << 13) };
        println!(
            "copy thread at idle I/O priority: {}",
            if r == 0 { "yes".to_string() } else { std::io::Error::last_os_error().to_string() }
        );
    }
    enter(1);
    let dest = keel_mvcc::store::defrag_path(&src);
    let (copy, _) = old.copy_to(&dest, false)?;
    enter(2);
    let in_use = copy.pages_in_use()?;
    enter(3);
    old.retire();
    let new = copy.rename_to(&src)?;
    drop(old);
    enter(4);
    std::thread::sleep(Duration::from_secs(10));
    keel_reclaim::wait_idle();
    stop.store(true, Ordering::Relaxed);
    wal.join().map_err(|_| "wal thread panicked")??;
    println!("copy {} MiB, {} MiB in use", new.size() >> 20, in_use >> 20);

    let v = match appends.lock() {
        Ok(mut v) => std::mem::take(&mut *v),
        Err(_) => return Err("poisoned".into()),
    };
    println!(
        "{:<16} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "phase", "appends", "write p50", "p99", "max", "sync p50", "p99", "max", ">10ms"
    );
    for (p, name) in PHASES.iter().enumerate() {
        let mut w: Vec<_> = v.iter().filter(|a| a.phase == p).map(|a| a.write).collect();
        let mut s: Vec<_> = v.iter().filter(|a| a.phase == p).map(|a| a.sync).collect();
        w.sort();
        s.sort();
        let over = s.iter().filter(|d| **d > Duration::from_millis(10)).count();
        println!(
            "{:<16} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6}",
            name,
            w.len(),
            pct(&w, 0.5),
            pct(&w, 0.99),
            pct(&w, 1.0),
            pct(&s, 0.5),
            pct(&s, 0.99),
            pct(&s, 1.0),
            over
        );
    }
    let mut slow: Vec<&Append> = v.iter().collect();
    slow.sort_by_key(|a| std::cmp::Reverse(a.write + a.sync));
    println!("slowest appends:");
    for a in slow.iter().take(12) {
        println!(
            "  at {:>8.3} s ({} + {:.3} s): write {:.2} ms, fdatasync {:.2} ms",
            a.at.as_secs_f64(),
            PHASES[a.phase],
            (a.at.saturating_sub(starts[a.phase])).as_secs_f64(),
            a.write.as_secs_f64() * 1e3,
            a.sync.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

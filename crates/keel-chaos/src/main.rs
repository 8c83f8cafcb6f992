//! keel-chaos: evidence that Keel neither loses nor invents data.
//!
//! `keel-chaos run` starts real Keel clusters (3 or 5 members on 127.0.0.x), drives them with
//! recording clients and watchers while a random schedule of faults runs ([`faults`]), heals
//! everything, reads back the final state, and checks the history: linearizability of the KV
//! operations ([`linearizability`]), the watch guarantees ([`watchcheck`]), every acknowledged
//! write present, and equal HashKV on every member. A failing history keeps its data dirs, its
//! history (`history.json`) and a report of the smallest failing window (`report.txt`).
//! `keel-chaos check FILE` checks a saved history again.
//!
//! Module map: history (types) <- workload (records) <- faults (injects, via cluster and proxy)
//! <- main (runs, checks, reports); the checkers only read histories.

mod cluster;
mod crashloop;
mod faults;
mod history;
mod linearizability;
mod points;
mod powerfs;
mod proxy;
mod watchcheck;
mod workload;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use history::{History, Input, Op, Output};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{HashKvRequest, RangeRequest, StatusRequest};
use linearizability::Verdict;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Shared, PREFIX};

#[derive(Parser)]
#[command(name = "keel-chaos", about = "Fault injection, linearizability and watch checking for Keel")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs histories against fresh clusters and checks each.
    Run(RunArgs),
    /// Checks a saved history.json again.
    Check { file: PathBuf },
    /// Kills one member at random points, again and again: every acknowledged write survives.
    CrashLoop {
        #[arg(long, default_value_t = 1000)]
        iterations: usize,
        /// The keel binary (with `--features failpoints`, half the iterations arm a crash point).
        #[arg(long, default_value = "target/release/keel")]
        keel: PathBuf,
        #[arg(long, default_value = "target/chaos/crash-loop")]
        out: PathBuf,
        #[arg(long, default_value_t = 24479)]
        port: u16,
        #[arg(long)]
        seed: Option<u64>,
        /// keel-powerfs: the data dir on a power-loss filesystem; every kill is a power cut.
        #[arg(long)]
        power: Option<PathBuf>,
        /// Failpoints armed in every start: a negative control (`wal::skip_fsync=return`,
        /// `wal::skip_dir_sync=return`), which must make the loop fail.
        #[arg(long)]
        always: Option<String>,
        /// With --power: a random disk fault (EIO on write/fsync/read, ENOSPC) in every iteration.
        #[arg(long)]
        disk_faults: bool,
        /// Data at size first: this many keys, each written twice (half of the records are then
        /// superseded), so that the iterations' compactions and defragments, and the kills and
        /// power cuts in them, work on a large backend; checked after every restart.
        #[arg(long, default_value_t = 0)]
        preload: usize,
        /// Bytes of each preloaded value.
        #[arg(long, default_value_t = 1024)]
        preload_value_size: usize,
    },
    /// Drives the lease-revoke and snapshot-restore apply paths to their crash points (a
    /// failpoints build) and checks each restart ([`points`]).
    Points {
        #[arg(long, default_value = "target/release/keel")]
        keel: PathBuf,
        #[arg(long, default_value = "target/chaos/points")]
        out: PathBuf,
        #[arg(long, default_value_t = 24579)]
        base_port: u16,
        /// keel-powerfs: every crash is followed by a power cut.
        #[arg(long)]
        power: Option<PathBuf>,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Cluster sizes, taken in turn for successive histories.
    #[arg(long, value_delimiter = ',', default_value = "3")]
    members: Vec<usize>,
    /// Number of histories (each on a fresh cluster).
    #[arg(long, default_value_t = 1)]
    histories: usize,
    /// Seconds of load and faults per history.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Stop after this many seconds in all, whatever `--histories` says.
    #[arg(long)]
    total_seconds: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 6)]
    clients: usize,
    #[arg(long, default_value_t = 3)]
    watchers: usize,
    /// Keys under /chaos/ (fewer keys: more contention).
    #[arg(long, default_value_t = 5)]
    keys: usize,
    /// Fault kinds to draw from (comma separated); `all` for every kind, `none` for none.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    faults: Vec<String>,
    /// Where histories and (failing) data dirs go.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// The keel binary (built with `--features failpoints` for the `crash` fault).
    #[arg(long, default_value = "target/release/keel")]
    keel: PathBuf,
    /// Client port of every member (peer: +1, proxy: +2), each member on its own 127.0.0.x
    /// (below the ephemeral port range, where outgoing connections could take it).
    #[arg(long, default_value_t = 24379)]
    base_port: u16,
    /// Search budget (steps) of the linearizability checker per key.
    #[arg(long, default_value_t = 20_000_000)]
    budget: u64,
    /// keel-powerfs: every member's data dir on a power-loss filesystem of its own, which the
    /// `power` and `power-all` faults cut (without it they are skipped).
    #[arg(long)]
    power: Option<PathBuf>,
    /// Keep data dirs of passing histories too.
    #[arg(long)]
    keep: bool,
    /// Mixed clusters: this etcd binary runs the first `--etcd-members` members of every
    /// history (members added later are of the kind of the member they replace).
    #[arg(long)]
    etcd: Option<PathBuf>,
    /// How many members of each history run etcd (with `--etcd`; at least one member stays Keel).
    #[arg(long, default_value_t = 1)]
    etcd_members: usize,
    /// Failpoints armed in every start of every Keel member: a negative control (e.g.
    /// `raft::read_index_local=return`, reads served unconfirmed), whose history must fail.
    #[arg(long)]
    always: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Check { file } => check_file(&file),
        Cmd::CrashLoop { iterations, keel, out, port, seed, power, always, disk_faults, preload, preload_value_size } => {
            let opts = crashloop::Options {
                keel: &keel,
                power: power.as_deref(),
                always: always.as_deref(),
                disk_faults,
                preload: (preload > 0).then_some((preload, preload_value_size)),
            };
            crash_loop(&opts, iterations, &out, port, seed).await
        }
        Cmd::Points { keel, out, base_port, power } => points(&keel, power.as_deref(), &out, base_port).await,
    };
    match r {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("keel-chaos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn crash_loop(opts: &crashloop::Options<'_>, iterations: usize, out: &Path, port: u16, seed: Option<u64>) -> Result<bool> {
    let keel = std::fs::canonicalize(opts.keel).with_context(|| format!("keel binary {}", opts.keel.display()))?;
    let power = match opts.power {
        Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("keel-powerfs binary {}", p.display()))?),
        None => None,
    };
    if opts.disk_faults && power.is_none() {
        bail!("--disk-faults needs --power (the faults are injected by keel-powerfs)");
    }
    let opts = crashloop::Options {
        keel: &keel,
        power: power.as_deref(),
        always: opts.always,
        disk_faults: opts.disk_faults,
        preload: opts.preload,
    };
    let seed = seed.unwrap_or_else(|| rand::thread_rng().gen());
    println!("crash-loop: seed {seed}, {iterations} iterations, data in {}", out.display());
    match crashloop::run(&opts, out, port, iterations, seed).await {
        Ok(o) => {
            println!(
                "crash-loop: ok: {} iterations ({} SIGKILLs, {} crashes at crash points, {} power cuts, {} disk faults injected, {} stops on them naming the file; {} with a compaction and a defragment, {} of those defragments finished before the kill), {} acknowledged writes, every one present after every restart",
                o.iterations, o.killed, o.crashed_at_points, o.power_cuts, o.disk_faults, o.stopped_on_fault, o.maintenance, o.defrags_done, o.acked
            );
            let _ = std::fs::remove_dir_all(out);
            Ok(true)
        }
        Err(e) => {
            println!("crash-loop: FAILED: {e:#} (data dir and member.log kept in {})", out.display());
            Ok(false)
        }
    }
}

async fn points(keel: &Path, power: Option<&Path>, out: &Path, base: u16) -> Result<bool> {
    let keel = std::fs::canonicalize(keel).with_context(|| format!("keel binary {}", keel.display()))?;
    let power = match power {
        Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("keel-powerfs binary {}", p.display()))?),
        None => None,
    };
    let _ = std::fs::remove_dir_all(out);
    match points::run(&keel, power.as_deref(), out, base).await {
        Ok(said) => {
            for s in said {
                println!("points: ok: {s}");
            }
            let _ = std::fs::remove_dir_all(out);
            Ok(true)
        }
        Err(e) => {
            println!("points: FAILED: {e:#} (data dirs and logs kept in {})", out.display());
            Ok(false)
        }
    }
}

fn check_file(file: &Path) -> Result<bool> {
    let h: History = serde_json::from_slice(&std::fs::read(file).with_context(|| format!("read {}", file.display()))?)?;
    let report = check_history(&h, 20_000_000);
    print!("{report}");
    Ok(report.is_empty())
}

#[derive(Default)]
struct Totals {
    histories: usize,
    failed: usize,
    ops: usize,
    unknown: usize,
    watch_events: usize,
    faults: BTreeMap<String, usize>,
    inconclusive: usize,
}

async fn run(a: RunArgs) -> Result<bool> {
    let kinds: Vec<String> = match a.faults.as_slice() {
        [x] if x == "all" => faults::ALL.iter().map(|s| s.to_string()).collect(),
        [x] if x == "none" => vec![],
        list => {
            for k in list {
                if !faults::ALL.contains(&k.as_str()) {
                    bail!("unknown fault {k:?}; known: {}", faults::ALL.join(","));
                }
            }
            list.to_vec()
        }
    };
    // Power cuts and disk faults need keel-powerfs: without --power they are not drawn at all
    // (drawn and skipped, they would show in the fault tally as if they had happened).
    let needs_power = ["power", "power-all", "disk"];
    let kinds: Vec<String> = if a.power.is_some() {
        kinds
    } else {
        let (kept, dropped): (Vec<String>, Vec<String>) = kinds.into_iter().partition(|k| !needs_power.contains(&k.as_str()));
        if !dropped.is_empty() {
            println!("keel-chaos: without --power, not drawing {}", dropped.join(","));
        }
        kept
    };
    if a.members.iter().any(|&m| m == 0 || m > 9) {
        bail!("--members: 1 to 9");
    }
    let keel = std::fs::canonicalize(&a.keel).with_context(|| format!("keel binary {}", a.keel.display()))?;
    let seed = a.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let began = Instant::now();
    let mut t = Totals::default();
    std::fs::create_dir_all(&a.out)?;
    println!(
        "keel-chaos: seed {seed}, {} histories of {} s, faults {}",
        a.histories,
        a.duration,
        if kinds.is_empty() { "none".into() } else { kinds.join(",") }
    );
    for n in 0..a.histories {
        if a.total_seconds.is_some_and(|s| began.elapsed() > Duration::from_secs(s)) {
            break;
        }
        let members = a.members[n % a.members.len()];
        let hseed = seed.wrapping_add(n as u64);
        let dir = a.out.join(format!("h{n:04}-{hseed}"));
        let _ = std::fs::remove_dir_all(&dir);
        println!("history {n}: {members} members, seed {hseed}, {}", dir.display());
        let (h, report) = match one_history(&a, &keel, &kinds, members, hseed, &dir).await {
            Ok(r) => r,
            Err(e) => {
                // The cluster did not recover (or could not be started): a failure too.
                t.histories += 1;
                t.failed += 1;
                let report = format!("AVAILABILITY: {e:#}\n");
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("report.txt"), &report)?;
                println!("history {n}: FAILED; data dirs and report.txt kept in {}", dir.display());
                print!("{report}");
                // Let the dropped cluster's proxies release their ports.
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        t.histories += 1;
        t.ops += h.ops.len();
        t.unknown += h.ops.iter().filter(|o| o.output == Output::Unknown).count();
        t.watch_events += h.watch.iter().map(|r| r.events.len()).sum::<usize>();
        for f in &h.faults {
            *t.faults.entry(f.kind.clone()).or_default() += 1;
        }
        let passed = report.is_empty() || report.lines().all(|l| l.starts_with("INCONCLUSIVE"));
        if !passed || a.keep {
            std::fs::write(dir.join("history.json"), serde_json::to_vec(&h)?)?;
        }
        if report.contains("INCONCLUSIVE") {
            t.inconclusive += 1;
        }
        if passed {
            println!(
                "history {n}: ok ({} ops, {} unknown, {} watch events, {} faults)",
                h.ops.len(),
                h.ops.iter().filter(|o| o.output == Output::Unknown).count(),
                h.watch.iter().map(|r| r.events.len()).sum::<usize>(),
                h.faults.len()
            );
            if !report.is_empty() {
                print!("{report}");
            }
            if !a.keep {
                // Passing histories keep only the members' logs.
                for e in std::fs::read_dir(&dir)?.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        } else {
            t.failed += 1;
            std::fs::write(dir.join("report.txt"), &report)?;
            println!("history {n}: FAILED; data dirs, history.json and report.txt kept in {}", dir.display());
            print!("{report}");
        }
    }
    println!(
        "keel-chaos: {} histories, {} failed, {} inconclusive; {} operations ({} unknown outcome), {} watch events; faults: {}",
        t.histories,
        t.failed,
        t.inconclusive,
        t.ops,
        t.unknown,
        t.watch_events,
        t.faults.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    Ok(t.failed == 0)
}

async fn one_history(a: &RunArgs, keel: &Path, kinds: &[String], members: usize, seed: u64, dir: &Path) -> Result<(History, String)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let net = proxy::Net::new(seed);
    let quota = faults::QUOTA_BYTES.to_string();
    let extra: Vec<String> =
        ["--heartbeat-interval", "100", "--election-timeout", "1000", "--snapshot-count", "500", "--quota-backend-bytes", &quota]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let power = match &a.power {
        Some(p) => Some(std::fs::canonicalize(p).with_context(|| format!("keel-powerfs binary {}", p.display()))?),
        None => None,
    };
    let mix = match &a.etcd {
        Some(e) => Some(cluster::Mix {
            etcd: std::fs::canonicalize(e).with_context(|| format!("etcd binary {}", e.display()))?,
            members: a.etcd_members.min(members - 1),
        }),
        None => None,
    };
    let mut cluster =
        cluster::Cluster::start_mixed(keel, mix.as_ref(), dir, a.base_port, members, net, extra, power.as_deref(), a.always.clone())
            .await?;
    if mix.is_some() {
        println!("  members: {}", cluster.describe());
    }
    let shared = Arc::new(Shared {
        start: Instant::now(),
        base: a.base_port,
        members: Mutex::new(cluster.ids()),
        etcd: Mutex::new(cluster.ids().into_iter().filter(|&i| cluster.is_etcd(i)).collect()),
        stop: AtomicBool::new(false),
        ops: Mutex::new(Vec::new()),
        watch: Mutex::new(Vec::new()),
        watch_starts: Mutex::new(Vec::new()),
        watcher_revs: Mutex::new(vec![0; a.watchers]),
        max_rev: AtomicI64::new(0),
    });
    let mut tasks = Vec::new();
    for w in 0..a.watchers {
        tasks.push(tokio::spawn(workload::watcher(shared.clone(), w, rng.gen())));
    }
    let mut clients = Vec::new();
    for c in 0..a.clients {
        clients.push(tokio::spawn(workload::client(shared.clone(), c, a.keys, rng.gen())));
    }
    let until = Instant::now() + Duration::from_secs(a.duration);
    let faults = if kinds.is_empty() {
        tokio::time::sleep_until(until.into()).await;
        vec![]
    } else {
        faults::schedule(&mut cluster, &shared, kinds, &mut rng, until).await
    };
    // Heal, let every member come back, then stop the clients.
    cluster.heal_all()?;
    for i in cluster.ids() {
        cluster.wait_healthy(i, Duration::from_secs(60)).await?;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    // Final reads of every key (recorded: they take part in the linearizability check).
    let first = cluster.ids()[0];
    let mut kv = KvClient::new(cluster::channel(first, a.base_port)?);
    for k in 0..a.keys {
        let key = format!("{PREFIX}k{k}");
        let call = shared.now();
        let r = kv.range(RangeRequest { key: key.clone().into(), ..Default::default() }).await.context("final read")?.into_inner();
        let id = shared.next_op_id();
        let out = Output::Get {
            kv: r.kvs.first().map(|k| history::Kv {
                value: String::from_utf8_lossy(&k.value).into_owned(),
                mod_rev: k.mod_revision,
                create_rev: k.create_revision,
                version: k.version,
                lease: k.lease,
            }),
            rev: r.header.as_ref().map(|h| h.revision).unwrap_or(0),
        };
        shared.ops.lock().push(Op {
            id,
            client: usize::MAX,
            member: first,
            key,
            input: Input::Get,
            output: out,
            call,
            ret: shared.now(),
            error: None,
        });
    }
    // The final revision; watchers finish once they have it all.
    let mut final_rev = 0;
    for i in cluster.ids() {
        let mut m = MaintenanceClient::new(cluster::channel(i, a.base_port)?);
        if let Ok(s) = m.status(StatusRequest {}).await {
            final_rev = final_rev.max(s.into_inner().header.map(|h| h.revision).unwrap_or(0));
        }
    }
    shared.max_rev.fetch_max(final_rev, Ordering::Relaxed);
    let mut stuck = Vec::new();
    for (w, t) in tasks.into_iter().enumerate() {
        if tokio::time::timeout(Duration::from_secs(30), t).await.is_err() {
            let at = shared.watcher_revs.lock().get(w).copied().unwrap_or(0);
            stuck.push(format!("watcher {w} did not reach revision {final_rev} within 30 s (last event at {at})"));
        }
    }
    // Every member's HashKV at the final revision.
    let mut hashes = Vec::new();
    for i in cluster.ids() {
        let mut m = MaintenanceClient::new(cluster::channel(i, a.base_port)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match m.hash_kv(HashKvRequest { revision: final_rev }).await {
                Ok(r) => {
                    hashes.push((i, r.into_inner().hash));
                    break;
                }
                Err(e) if Instant::now() > deadline => {
                    stuck.push(format!("m{i}: HashKV at {final_rev} failed: {}", e.message()));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    cluster.shutdown().await;
    // Power-loss filesystems go with the cluster: their data is copied out (kept if it fails).
    cluster.keep_disks(dir);
    let h = History {
        members,
        seed,
        ops: std::mem::take(&mut *shared.ops.lock()),
        watch: std::mem::take(&mut *shared.watch.lock()),
        watch_starts: std::mem::take(&mut *shared.watch_starts.lock()),
        faults,
        compacted: 0,
        final_rev,
        hashes,
    };
    let mut report = check_history(&h, a.budget);
    for s in stuck {
        let _ = writeln!(report, "DURABILITY: {s}");
    }
    Ok((h, report))
}

/// Runs every checker; returns a readable report, empty when the history passes.
fn check_history(h: &History, budget: u64) -> String {
    let mut out = String::new();
    let (verdicts, rev_problems) = linearizability::check(h, budget);
    let by_id: BTreeMap<usize, &Op> = h.ops.iter().map(|o| (o.id, o)).collect();
    for v in verdicts {
        match v {
            Verdict::Ok => {}
            Verdict::Inconclusive { key, ops } => {
                let _ = writeln!(out, "INCONCLUSIVE: key {key}: {ops} operations, search budget exhausted");
            }
            Verdict::Violation(f) => {
                let _ = writeln!(out, "LINEARIZABILITY: key {} is not linearizable", f.key);
                let _ = writeln!(out, "  longest linearization: {} operations, ending in state {:?}", f.longest.len(), f.state);
                let _ = writeln!(out, "  its last operations:");
                for id in f.longest.iter().rev().take(5).rev() {
                    if let Some(o) = by_id.get(id) {
                        let _ = writeln!(out, "    {}", describe(o));
                    }
                }
                let _ = writeln!(out, "  none of these could come next (the smallest failing window):");
                for id in &f.stuck {
                    if let Some(o) = by_id.get(id) {
                        let _ = writeln!(out, "    {}", describe(o));
                    }
                }
            }
        }
    }
    for p in rev_problems {
        let _ = writeln!(out, "REVISION: {p}");
    }
    for p in watchcheck::check(h) {
        let _ = writeln!(out, "WATCH: {p}");
    }
    if let Some((first, hash)) = h.hashes.first() {
        for (m, x) in &h.hashes {
            if x != hash {
                let _ = writeln!(out, "DURABILITY: HashKV at revision {}: m{first} {hash:#x}, m{m} {x:#x}", h.final_rev);
            }
        }
    }
    out
}

fn describe(o: &Op) -> String {
    let ms = |t: u64| if t == history::NEVER { "never".to_string() } else { format!("{:.3}", t as f64 / 1e6) };
    format!(
        "op {} client {} m{} [{} ms .. {} ms] {:?} -> {:?}{}",
        o.id,
        o.client,
        o.member,
        ms(o.call),
        ms(o.ret),
        o.input,
        o.output,
        o.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
    )
}

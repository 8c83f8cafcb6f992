//! Crash consistency: one member, killed at random points again and again, must always come
//! back with every write it acknowledged and a revision that never went backwards.
//!
//! Each iteration starts the member on the same data dir (half of the time with a random crash
//! point armed, see [`crate::faults::CRASH_POINTS`]), checks what earlier iterations were told,
//! writes unique keys from several clients (sometimes compacting and defragmenting meanwhile),
//! and SIGKILLs the process at a random moment, if a crash point did not end it first.
//!
//! With `power` the data dir is on a keel-powerfs mount ([`crate::powerfs`]) and every kill is
//! followed by a power cut: whatever the member did not fsync (file data, directory entries) is
//! gone before it starts again.

use anyhow::{bail, Context, Result};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{CompactionRequest, DefragmentRequest, PutRequest, RangeRequest, StatusRequest};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// The member process; killed when dropped, so that no error path leaves it running.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Outcome {
    pub iterations: usize,
    pub acked: usize,
    pub crashed_at_points: usize,
    pub killed: usize,
    pub power_cuts: usize,
    /// Iterations in which the member stopped on an injected disk fault.
    pub stopped_on_fault: usize,
    /// Disk faults injected in all.
    pub disk_faults: u64,
    /// Iterations that started a compaction and a defragment, and the defragments that
    /// finished before the kill (the rest were cut short, at some step).
    pub maintenance: usize,
    pub defrags_done: usize,
}

/// What the crash loop runs on.
pub struct Options<'a> {
    pub keel: &'a Path,
    /// keel-powerfs: the data dir on a power-loss filesystem, and a power cut after every kill.
    pub power: Option<&'a Path>,
    /// Armed in every start (a negative control, e.g. `wal::skip_fsync=return`).
    pub always: Option<&'a str>,
    /// With `power`: each iteration arms a random disk fault (EIO on write, fsync or read,
    /// ENOSPC) under the load; a member that hits one must stop naming the file, and start again
    /// with every acknowledged write once the fault is cleared.
    pub disk_faults: bool,
    /// (keys, value bytes): data at size written first, each key twice, and checked after every
    /// restart; the iterations then run longer (up to 4 s) and compact and defragment more often,
    /// so that kills and power cuts land in every step of a compaction and a defragment of a
    /// large backend.
    pub preload: Option<(usize, usize)>,
}

/// The preloaded key `i`.
fn preload_key(i: usize) -> String {
    format!("/size/{i:08}")
}

/// The value of the preloaded key `key` after its second write: `len` bytes.
fn preload_value(key: &str, len: usize) -> Vec<u8> {
    let mut v = format!("{key}=2:").into_bytes();
    v.resize(len.max(v.len()), b'x');
    v
}

/// Writes the preloaded data (`keys` keys of `len` bytes, each twice) through 8 clients.
async fn preload(ch: &Channel, keys: usize, len: usize) -> Result<()> {
    let started = Instant::now();
    for pass in [1u8, 2] {
        let mut tasks = Vec::new();
        for c in 0..8 {
            let mut kv = KvClient::new(ch.clone());
            tasks.push(tokio::spawn(async move {
                for i in (c..keys).step_by(8) {
                    let key = preload_key(i);
                    let mut value = preload_value(&key, len);
                    if pass == 1 {
                        value[key.len() + 1] = b'1';
                    }
                    let mut tries = 0;
                    while let Err(e) = kv.put(PutRequest { key: key.clone().into(), value: value.clone(), ..Default::default() }).await {
                        tries += 1;
                        if tries > 20 {
                            bail!("preload of {key}: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
    }
    println!("crash-loop: preloaded {keys} keys of {len} bytes, each written twice, in {:.1?}", started.elapsed());
    Ok(())
}

/// [`check`], then [`check_preload`] when there is a preload (`(keys, len)`): a crash point
/// that ends the member during either is a crash like any other.
async fn check_all(
    ch: &Channel,
    acked: &[(String, i64)],
    max_rev: i64,
    rng: &mut StdRng,
    preload: Option<(usize, usize)>,
) -> Result<i64, Check> {
    let rev = check(ch, acked, max_rev, rng).await?;
    if let Some((keys, len)) = preload {
        check_preload(ch, keys, len, rng).await?;
    }
    Ok(rev)
}

/// Checks the preloaded data: all `keys` keys there, and 200 random ones with their second
/// value.
async fn check_preload(ch: &Channel, keys: usize, len: usize, rng: &mut StdRng) -> Result<(), Check> {
    let mut kv = KvClient::new(ch.clone());
    let count = count(&mut kv, b"/size/", b"/size0").await.map_err(|e| unreachable(e, "count the preloaded keys"))?;
    if count as usize != keys {
        return Err(Check::Violation(anyhow::anyhow!("{count} preloaded keys after a crash, {keys} were written")));
    }
    for _ in 0..200 {
        let key = preload_key(rng.gen_range(0..keys));
        let resp = kv
            .range(RangeRequest { key: key.clone().into(), serializable: true, ..Default::default() })
            .await
            .map_err(|e| unreachable(e, "read a preloaded key"))?
            .into_inner();
        match resp.kvs.first() {
            Some(k) if k.value == preload_value(&key, len) && k.version == 2 => {}
            other => {
                return Err(Check::Violation(anyhow::anyhow!(
                    "preloaded {key} lost or changed after a crash: {:?}",
                    other.map(|k| (k.version, String::from_utf8_lossy(&k.value[..k.value.len().min(40)]).into_owned()))
                )))
            }
        }
    }
    Ok(())
}

/// Arms one random disk fault; what was armed.
fn arm_disk_fault(d: &mut crate::powerfs::Disk, rng: &mut StdRng) -> Result<String> {
    let path = *["", " /wal/", " /snap/"].choose(rng).expect("paths");
    let cmd = match rng.gen_range(0..5) {
        0 => format!("fault write eio {:.1}%{path}", rng.gen_range(0.2..3.0)),
        1 => format!("fault fsync eio {}{path}", rng.gen_range(1..4)),
        2 => format!("fault read eio {:.1}%{path}", rng.gen_range(0.2..3.0)),
        3 => format!("fault write enospc {:.1}%{path}", rng.gen_range(0.2..3.0)),
        _ => format!("capacity {}", d.stat("used")? + rng.gen_range(0..64 << 10)),
    };
    d.command(&cmd)?;
    Ok(cmd)
}

/// The last error line of the member's log, if it names a file of its data dir.
fn names_a_file(log: &Path, data: &Path) -> Option<String> {
    use std::io::{Read, Seek};
    // The log's last 64 KiB hold its last lines (the whole log grows over the iterations).
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().take(50).find(|l| l.contains("\"level\":\"error\""))?;
    line.contains(&*data.to_string_lossy()).then(|| line.to_string())
}

fn spawn(bin: &Path, dir: &Path, data: &Path, port: u16, failpoints: Option<&str>) -> Result<Member> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("member.log"))?;
    let err = log.try_clone()?;
    let url = format!("http://127.0.0.1:{port}");
    let purl = format!("http://127.0.0.1:{}", port + 1);
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "c1", "--data-dir"])
        .arg(data)
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &purl, "--initial-advertise-peer-urls", &purl])
        .args(["--initial-cluster", &format!("c1={purl}"), "--snapshot-count", "300"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .env("RUST_BACKTRACE", "0");
    if let Some(fp) = failpoints {
        cmd.env("FAILPOINTS", fp);
    }
    Ok(Member(cmd.spawn()?))
}

async fn ready(ch: &Channel, child: &mut Member, limit: Duration) -> Result<bool> {
    let child = &mut child.0;
    let deadline = Instant::now() + limit;
    let mut m = MaintenanceClient::new(ch.clone());
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), m.status(StatusRequest {})).await {
            if r.get_ref().leader != 0 {
                return Ok(true);
            }
        }
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        if Instant::now() > deadline {
            bail!("member not ready after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The member did not answer `what`.
fn unreachable(e: tonic::Status, what: &str) -> Check {
    Check::Unreachable(anyhow::Error::new(e).context(what.to_string()))
}

/// The number of keys in `[key, end)`, read serializably (from the member alone).
async fn count(kv: &mut KvClient<Channel>, key: &[u8], end: &[u8]) -> Result<i64, tonic::Status> {
    let r = kv
        .range(RangeRequest { key: key.to_vec(), range_end: end.to_vec(), count_only: true, serializable: true, ..Default::default() })
        .await?;
    Ok(r.into_inner().count)
}

/// Why a check of the acknowledged writes failed.
enum Check {
    /// The member answered, and the answer breaks a guarantee.
    Violation(anyhow::Error),
    /// The member did not answer.
    Unreachable(anyhow::Error),
}

/// Waits up to `limit` for the member process to end; true when it has.
async fn exited(child: &mut Member, limit: Duration) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if child.0.try_wait()?.is_some() {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that the member's revision is not behind `max_rev` and that the last 400 and 200 more
/// random acknowledged writes are there with their revisions; returns the member's revision.
async fn check(ch: &Channel, acked: &[(String, i64)], max_rev: i64, rng: &mut StdRng) -> Result<i64, Check> {
    let mut kv = KvClient::new(ch.clone());
    let status = MaintenanceClient::new(ch.clone()).status(StatusRequest {}).await.map_err(|e| unreachable(e, "status"))?.into_inner();
    let rev = status.header.map(|h| h.revision).unwrap_or(0);
    if rev < max_rev {
        return Err(Check::Violation(anyhow::anyhow!("revision went back from {max_rev} to {rev} after a crash")));
    }
    let mut sample: Vec<&(String, i64)> = acked.iter().rev().take(400).collect();
    sample.extend(acked.choose_multiple(rng, 200));
    for (key, r) in sample {
        let resp = kv
            .range(RangeRequest { key: key.clone().into(), serializable: true, ..Default::default() })
            .await
            .map_err(|e| unreachable(e, "read back"))?
            .into_inner();
        match resp.kvs.first() {
            Some(k) if k.value == key.as_bytes() && k.mod_revision == *r => {}
            other => {
                return Err(Check::Violation(anyhow::anyhow!(
                    "acknowledged write {key} (revision {r}) lost or changed after a crash: {:?}",
                    other.map(|k| (String::from_utf8_lossy(&k.value).into_owned(), k.mod_revision))
                )))
            }
        }
    }
    let count = count(&mut kv, b"/crash/", b"/crash0").await.map_err(|e| unreachable(e, "count"))?;
    if (count as usize) < acked.len() {
        return Err(Check::Violation(anyhow::anyhow!("{count} keys after a crash, {} were acknowledged", acked.len())));
    }
    Ok(rev)
}

pub async fn run(opts: &Options<'_>, dir: &Path, port: u16, iterations: usize, seed: u64) -> Result<Outcome> {
    if opts.power.is_some() {
        let _ = std::process::Command::new("umount").arg("-l").arg(dir.join("disk")).stderr(std::process::Stdio::null()).status();
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut disk = match opts.power {
        Some(pfs) => Some(crate::powerfs::Disk::mount(pfs, &dir.join("disk"))?),
        None => None,
    };
    let r = run_on(opts, &mut disk, dir, port, iterations, seed).await;
    if let (Err(_), Some(_)) = (&r, &disk) {
        // The mount goes with the filesystem process: keep what it held for a look.
        let _ = std::process::Command::new("cp").arg("-a").arg(dir.join("disk").join("data")).arg(dir.join("data-at-failure")).status();
    }
    r
}

async fn run_on(
    opts: &Options<'_>,
    disk: &mut Option<crate::powerfs::Disk>,
    dir: &Path,
    port: u16,
    iterations: usize,
    seed: u64,
) -> Result<Outcome> {
    let bin = opts.keel;
    let data = if disk.is_some() { dir.join("disk").join("data") } else { dir.join("data") };
    let spawn = |bin: &Path, dir: &Path, port: u16, fp: Option<&str>| {
        let fp = match (fp, opts.always) {
            (Some(a), Some(b)) => Some(format!("{a};{b}")),
            (a, b) => a.or(b).map(str::to_owned),
        };
        spawn(bin, dir, &data, port, fp.as_deref())
    };
    let mut cuts = 0usize;
    // Another process on these ports would answer in the member's place.
    for p in [port, port + 1] {
        std::net::TcpListener::bind(("127.0.0.1", p)).with_context(|| format!("port {p} is in use"))?;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let ch = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    // Compactions and defragments: a defragment at size takes longer than 3 s.
    let ch_long = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(180))
        .connect_lazy();
    // Every acknowledged write: (key, revision). Keys are unique, values equal keys.
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut max_rev = 0i64;
    let mut out = Outcome {
        iterations: 0,
        acked: 0,
        crashed_at_points: 0,
        killed: 0,
        power_cuts: 0,
        stopped_on_fault: 0,
        disk_faults: 0,
        maintenance: 0,
        defrags_done: 0,
    };
    let defrags_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if let Some((keys, len)) = opts.preload {
        let mut child = spawn(bin, dir, port, None)?;
        if !ready(&ch, &mut child, Duration::from_secs(30)).await? {
            bail!("the member does not start for the preload (see {})", dir.join("member.log").display());
        }
        preload(&ch, keys, len).await?;
        let status = MaintenanceClient::new(ch.clone()).status(StatusRequest {}).await?.into_inner();
        max_rev = status.header.map(|h| h.revision).unwrap_or(0);
        println!("crash-loop: backend {} MB at revision {max_rev}", status.db_size >> 20);
        drop(child);
        if let Some(d) = disk.as_mut() {
            d.cut()?;
            cuts += 1;
        }
    }
    for it in 0..iterations {
        // Disk-fault runs arm no crash point: a stop is then the disk fault's.
        let fp = if !opts.disk_faults && rng.gen_bool(0.5) {
            let p = *crate::faults::CRASH_POINTS.choose(&mut rng).expect("crash points");
            Some(format!("{p}={}%return", rng.gen_range(1..=10)))
        } else {
            None
        };
        if let (Some(d), true) = (disk.as_mut(), opts.disk_faults && rng.gen_bool(0.3)) {
            // A disk that fails a read while the member starts (WAL, snapshot, backend): the
            // member must refuse to start naming the file, and start once the fault is gone.
            let cmd = format!("fault read eio {}", rng.gen_range(1..4));
            d.command(&cmd)?;
            let mut c = spawn(bin, dir, port, None)?;
            let up = ready(&ch, &mut c, Duration::from_secs(30)).await?;
            d.command("clear")?;
            drop(c);
            if !up {
                let Some(line) = names_a_file(&dir.join("member.log"), &data) else {
                    bail!(
                        "iteration {it}: the member did not start under {cmd:?} and named no file (see {})",
                        dir.join("member.log").display()
                    );
                };
                println!("crash-loop: iteration {it}: refused to start under {cmd:?}: {}", line.chars().take(400).collect::<String>());
                out.stopped_on_fault += 1;
            }
            d.cut()?;
            cuts += 1;
        }
        let mut child = spawn(bin, dir, port, fp.as_deref())?;
        // Startup itself may hit an armed crash point (a WAL write on start): start again unarmed.
        if !ready(&ch, &mut child, Duration::from_secs(30)).await.with_context(|| format!("iteration {it}"))? {
            out.crashed_at_points += 1;
            if let Some(d) = disk.as_mut() {
                d.cut()?;
                cuts += 1;
            }
            child = spawn(bin, dir, port, None)?;
            if !ready(&ch, &mut child, Duration::from_secs(30)).await? {
                bail!("iteration {it}: the member does not start after a crash (see {})", dir.join("member.log").display());
            }
        }
        // Everything acknowledged before must be there, at a revision no older. An armed crash
        // point may end the member while it is being checked (a backend commit on a timer): that
        // is a crash like any other, so the member is started again, unarmed, and checked again.
        let rev = match check_all(&ch, &acked, max_rev, &mut rng, opts.preload).await {
            Ok(rev) => rev,
            Err(Check::Violation(e)) => return Err(e.context(format!("iteration {it}"))),
            Err(Check::Unreachable(e)) => {
                if fp.is_none() || !exited(&mut child, Duration::from_secs(5)).await? {
                    return Err(e.context(format!("iteration {it}: the member stopped answering")));
                }
                out.crashed_at_points += 1;
                if let Some(d) = disk.as_mut() {
                    d.cut()?;
                    cuts += 1;
                }
                child = spawn(bin, dir, port, None)?;
                if !ready(&ch, &mut child, Duration::from_secs(30)).await? {
                    bail!("iteration {it}: the member does not start after a crash (see {})", dir.join("member.log").display());
                }
                match check_all(&ch, &acked, max_rev, &mut rng, opts.preload).await {
                    Ok(rev) => rev,
                    Err(Check::Violation(e) | Check::Unreachable(e)) => return Err(e.context(format!("iteration {it}"))),
                }
            }
        };
        let armed = match disk.as_mut() {
            Some(d) if opts.disk_faults => Some(arm_disk_fault(d, &mut rng)?),
            _ => None,
        };
        // Load, then a kill at a random moment.
        let new: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
        let mut tasks = Vec::new();
        for c in 0..4 {
            let mut kv = KvClient::new(ch.clone());
            let new = new.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("/crash/{it:05}-{c}-{n:05}");
                    match kv.put(PutRequest { key: key.clone().into(), value: key.clone().into(), ..Default::default() }).await {
                        Ok(r) => new.lock().push((key, r.into_inner().header.map(|h| h.revision).unwrap_or(0))),
                        Err(_) => return,
                    }
                }
            }));
        }
        if armed.is_some() && !acked.is_empty() {
            // Reads of older keys, so that reads from the backend meet the read faults; errors
            // are fine (a read changes nothing), only the writes' acknowledgements count.
            let mut kv = KvClient::new(ch.clone());
            let keys: Vec<String> = acked.choose_multiple(&mut rng, 2000).map(|(k, _)| k.clone()).collect();
            tasks.push(tokio::spawn(async move {
                for k in keys.iter().cycle() {
                    let r = kv.range(RangeRequest { key: k.clone().into(), serializable: true, ..Default::default() }).await;
                    if matches!(&r, Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown) {
                        return;
                    }
                }
            }));
        }
        if rng.gen_bool(if opts.preload.is_some() { 0.6 } else { 0.2 }) {
            let floor = max_rev.max(rev);
            let (mut kv, mut m) = (KvClient::new(ch_long.clone()), MaintenanceClient::new(ch_long.clone()));
            let done = defrags_done.clone();
            out.maintenance += 1;
            let task = tokio::spawn(async move {
                if floor > 1 {
                    let _ = kv.compact(CompactionRequest { revision: floor, physical: false }).await;
                }
                if m.defragment(DefragmentRequest {}).await.is_ok() {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
            if opts.preload.is_some() && rng.gen_bool(0.3) {
                // At size a defragment outlasts the kill's delay: sometimes it is let finish, so
                // that its last steps (the catch-up, the swap) and what follows are cut too.
                let _ = tokio::time::timeout(Duration::from_secs(180), task).await;
            } else {
                tasks.push(task);
            }
        }
        let longest = if opts.preload.is_some() { 4000 } else { 400 };
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..longest))).await;
        let stopped = child.0.try_wait()?.is_some();
        if stopped && armed.is_some() {
            out.stopped_on_fault += 1;
            // Fail-stop with a clear error: the file it could not read or write.
            if let Some(line) = names_a_file(&dir.join("member.log"), &data) {
                println!(
                    "crash-loop: iteration {it}: stopped under {:?}: {}",
                    armed.as_deref().unwrap_or_default(),
                    line.chars().take(400).collect::<String>()
                );
            } else {
                bail!(
                    "iteration {it}: the member stopped under {:?} without an error naming a file of its data dir (see {})",
                    armed.as_deref().unwrap_or_default(),
                    dir.join("member.log").display()
                );
            }
        } else if stopped {
            out.crashed_at_points += 1;
        } else {
            out.killed += 1;
        }
        drop(child);
        for t in tasks {
            let _ = t.await;
        }
        if let (Some(d), Some(_)) = (disk.as_mut(), &armed) {
            d.command("clear")?;
            out.disk_faults = d.stat("injected")?;
        }
        if let Some(d) = disk.as_mut() {
            d.cut().with_context(|| format!("iteration {it}: power cut"))?;
            cuts += 1;
        }
        let new = std::mem::take(&mut *new.lock());
        for (_, r) in &new {
            max_rev = max_rev.max(*r);
        }
        acked.extend(new);
        out.iterations += 1;
        if (it + 1) % 50 == 0 {
            println!("crash-loop: {} iterations, {} acknowledged writes, all present", it + 1, acked.len());
        }
    }
    out.acked = acked.len();
    out.power_cuts = cuts;
    out.defrags_done = defrags_done.load(std::sync::atomic::Ordering::Relaxed);
    Ok(out)
}

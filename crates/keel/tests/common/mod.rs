//! Helpers for tests that run real `keel` (and real `etcd`) processes on 127.0.0.1 ports.
#![allow(dead_code)]

use keel_proto::etcdserverpb::kv_client::KvClient;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A port nothing listens on now, never handed out before in this test process: the kernel may
/// give a released port out again at once, and two roles of one cluster (a member's client port
/// and a proxy's, say) sharing one made a member fail with "address already in use".
pub fn free_port() -> u16 {
    // Below Linux's ephemeral range (32768-60999): an outgoing connection from a member's
    // 127.0.0.x address is given a local port from that range and could take a port handed out
    // here before its member binds it ("Address already in use", seen in CI under load). Clear
    // of the fixed base ports etcd's e2e suites use (2000, 3000, 10000, 20000 and up), so a
    // process a test left behind cannot hold them. Each test process starts at its own place in
    // the range; a port is handed out once per process, and only when nothing listens on it at
    // any address.
    const LOW: u32 = 11_000;
    const SPAN: u32 = 8_000;
    static NEXT: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let mut at = next.unwrap_or_else(|| {
        (std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()))
            % SPAN
    });
    for _ in 0..SPAN {
        at = (at + 1) % SPAN;
        let port = (LOW + at) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            *next = Some(at);
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A server process (keel or etcd) with its data dir and log file.
pub struct Proc {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub client_port: u16,
    /// Client URL, e.g. http://127.0.0.2:4567.
    pub url: String,
    pub log: PathBuf,
    /// Where this process's output starts in the (shared, appended) log file.
    log_start: u64,
}

pub fn keel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel"))
}

/// Starts `bin` as a single member with etcd's flags; output goes to `<data_dir>.log`.
pub fn start(bin: &Path, data_dir: &Path, client_port: u16, peer_port: u16, extra: &[&str]) -> Proc {
    let curl = format!("http://127.0.0.1:{client_port}");
    let purl = format!("http://127.0.0.1:{peer_port}");
    let mut args = member_args(data_dir, &curl, &purl);
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(bin, data_dir, &curl, &args)
}

/// etcd's flags for a single member `t1` in `data_dir`, serving clients on `curl` and peers
/// on `purl`.
pub fn member_args(data_dir: &Path, curl: &str, purl: &str) -> Vec<String> {
    let mut args: Vec<String> = vec!["--name".into(), "t1".into(), "--data-dir".into(), data_dir.to_string_lossy().into_owned()];
    for a in ["--listen-client-urls", "--advertise-client-urls"] {
        args.push(a.into());
        args.push(curl.into());
    }
    for a in ["--listen-peer-urls", "--initial-advertise-peer-urls"] {
        args.push(a.into());
        args.push(purl.into());
    }
    args.push("--initial-cluster".into());
    args.push(format!("t1={purl}"));
    args
}

/// Starts `bin` with `args`; output goes to `<data_dir>.log`.
pub fn spawn(bin: &Path, data_dir: &Path, client_url: &str, args: &[String]) -> Proc {
    let log = data_dir.with_extension("log");
    let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = Command::new(bin).args(args).stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn server");
    let client_port = client_url.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0);
    Proc { child: Some(child), data_dir: data_dir.to_path_buf(), client_port, url: client_url.to_string(), log, log_start }
}

impl Proc {
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            use std::io::Seek;
            let _ = f.seek(std::io::SeekFrom::Start(self.log_start));
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the server serves clients, or for it to exit. Returns false if it exited;
    /// panics after 30 s. Serving is observed (an HTTP answer on a plain client URL: the client
    /// ports answer only once the member has published itself, as etcd's), or, for TLS and unix
    /// URLs, read from its "ready to serve client requests" line.
    pub fn wait_ready(&mut self) -> bool {
        match self.wait_ready_for(Duration::from_secs(30)) {
            Some(ready) => ready,
            None => panic!("server did not become ready:\n{}", self.log_text()),
        }
    }

    /// Like [`Proc::wait_ready`], but `None` after `limit`.
    pub fn wait_ready_for(&mut self, limit: Duration) -> Option<bool> {
        let deadline = Instant::now() + limit;
        loop {
            if self.answers_http() || self.log_text().contains("ready to serve client requests") {
                return Some(true);
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return Some(false);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when the plain HTTP client URL answers a request (any status).
    fn answers_http(&self) -> bool {
        use std::io::Write;
        let Some(addr) = self.url.strip_prefix("http://") else { return false };
        let Ok(sa) = addr.parse::<std::net::SocketAddr>() else { return false };
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(200)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if write!(s, "GET /version HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
            return false;
        }
        let mut head = [0u8; 9];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        self.url.clone()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> Option<i32> {
        if let Some(c) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let code = self.wait_exit();
        self.child = None;
        code
    }

    pub async fn kv(&self) -> KvClient<Channel> {
        let ch = match Channel::from_shared(self.endpoint()).expect("uri").connect().await {
            Ok(c) => c,
            Err(e) => panic!("connect to {}: {e:?}\n{}", self.endpoint(), self.log_text()),
        };
        KvClient::new(ch)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A plain HTTP/1.0 GET of `path` on a plain client URL; the body.
pub fn http_get(url: &str, path: &str) -> String {
    use std::io::Write;
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The WAL segments of a data dir, oldest first.
pub fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir.join("member/wal"))
        .expect("wal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().map(|x| x == "wal").unwrap_or(false))
        .collect();
    v.sort();
    v
}

/// Real etcd and Keel, each a single fresh member in `dir`, both ready: the differential tests'
/// oracle and subject. None when `/usr/bin/etcd` is missing and `KEEL_SKIP_ETCD_ORACLE=1` allows
/// skipping; a missing etcd fails the test otherwise.
pub fn etcd_and_keel(dir: &Path) -> Option<(Proc, Proc)> {
    let etcd = Path::new("/usr/bin/etcd");
    if !etcd.exists() {
        if std::env::var("KEEL_SKIP_ETCD_ORACLE").as_deref() == Ok("1") {
            eprintln!("skipping: /usr/bin/etcd missing and KEEL_SKIP_ETCD_ORACLE=1");
            return None;
        }
        panic!("/usr/bin/etcd (Debian package etcd-server) is needed as the oracle; set KEEL_SKIP_ETCD_ORACLE=1 to skip");
    }
    let mut e = start(etcd, &dir.join("etcd.etcd"), free_port(), free_port(), &[]);
    let mut k = start(&keel_bin(), &dir.join("keel.etcd"), free_port(), free_port(), &[]);
    // etcd 3.4 logs "ready to serve client requests" too.
    assert!(e.wait_ready(), "etcd did not start: {}", e.log_text());
    assert!(k.wait_ready(), "keel did not start: {}", k.log_text());
    Some((e, k))
}

/// etcd's server, etcdctl and (3.6) etcdutl of one version; None (with a note) when missing and
/// KEEL_SKIP_ETCD_ORACLE=1, a failure otherwise.
pub struct Etcd {
    pub version: &'static str,
    pub server: PathBuf,
    pub ctl: PathBuf,
    pub utl: Option<PathBuf>,
}

pub fn etcd(version: &'static str) -> Option<Etcd> {
    let e = match version {
        "3.4" => Etcd { version, server: "/usr/bin/etcd".into(), ctl: "/usr/bin/etcdctl".into(), utl: None },
        _ => {
            // "3.6" is the pinned 3.6.16; a full version ("v3.7.3") is that release's build.
            let release = if version.starts_with('v') { version } else { "v3.6.16" };
            let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/etcd-ref").join(release).join("bin");
            Etcd { version, server: bin.join("etcd"), ctl: bin.join("etcdctl"), utl: Some(bin.join("etcdutl")) }
        }
    };
    if e.server.exists() {
        return Some(e);
    }
    if std::env::var("KEEL_SKIP_ETCD_ORACLE").as_deref() == Ok("1") {
        eprintln!("skipping etcd {version}: {} missing and KEEL_SKIP_ETCD_ORACLE=1", e.server.display());
        return None;
    }
    panic!(
        "{} is needed (etcd {version}: Debian etcd-server, or scripts/etcd-ref.sh VERSION); KEEL_SKIP_ETCD_ORACLE=1 skips",
        e.server.display()
    );
}

/// One member named `name` on `ip` with its own ports, started from `dir`.
pub struct Node {
    pub name: String,
    pub ip: String,
    pub client: u16,
    pub peer: u16,
}

impl Node {
    pub fn new(name: &str, ip: &str) -> Node {
        Node { name: name.into(), ip: ip.into(), client: free_port(), peer: free_port() }
    }
    pub fn curl(&self) -> String {
        format!("http://{}:{}", self.ip, self.client)
    }
    pub fn purl(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer)
    }
    /// etcd's flags for this member with data in `dir`.
    pub fn args(&self, dir: &Path, initial_cluster: &str) -> Vec<String> {
        let (dir, curl, purl) = (dir.to_string_lossy(), self.curl(), self.purl());
        let flags = [
            ("--name", self.name.as_str()),
            ("--data-dir", &dir),
            ("--listen-client-urls", &curl),
            ("--advertise-client-urls", &curl),
            ("--listen-peer-urls", &purl),
            ("--initial-advertise-peer-urls", &purl),
            ("--initial-cluster", initial_cluster),
            ("--initial-cluster-token", "migrate"),
        ];
        flags.iter().flat_map(|(f, v)| [f.to_string(), v.to_string()]).collect()
    }
    /// `snapshot restore`'s flags (etcdctl, etcdutl and keel take the same) for this member.
    pub fn restore_args(&self, dir: &Path, initial_cluster: &str) -> Vec<String> {
        let (dir, purl) = (dir.to_string_lossy(), self.purl());
        let flags = [
            ("--name", self.name.as_str()),
            ("--data-dir", &dir),
            ("--initial-cluster", initial_cluster),
            ("--initial-cluster-token", "migrate"),
            ("--initial-advertise-peer-urls", &purl),
        ];
        flags.iter().flat_map(|(f, v)| [f.to_string(), v.to_string()]).collect()
    }
    /// Starts `bin` as this member (not waiting).
    pub fn spawn(&self, bin: &Path, dir: &Path, initial_cluster: &str) -> Proc {
        spawn(bin, dir, &self.curl(), &self.args(dir, initial_cluster))
    }
    /// Starts `bin` as this member and waits until it serves.
    pub fn start(&self, bin: &Path, dir: &Path, initial_cluster: &str) -> Proc {
        let mut p = self.spawn(bin, dir, initial_cluster);
        assert!(p.wait_ready(), "{} did not start from {}:\n{}", bin.display(), dir.display(), p.log_text());
        p
    }
}

/// Waits until the Keel leader at `client_url` holds no log entry at or before `index + 1`
/// (`keel_raft_log_first_index`), so a follower whose log ends at `index` needs a snapshot. A
/// Keel leader keeps its log for a follower heard from within the last election timeout and
/// lets it go once it finds the follower gone; a burst of writes may end before that.
pub async fn wait_raft_log_past(client_url: &str, index: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let first = http_get(client_url, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix("keel_raft_log_first_index ").and_then(|v| v.trim().parse::<u64>().ok()));
        if first.is_some_and(|f| f > index + 1) {
            return;
        }
        assert!(Instant::now() < deadline, "the leader still holds the cut-off follower's entries after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Snapshots the member at `client_url` has sent with body `format` (`keel`: Keel's records, to
/// Keel members; `etcd`: etcd's backend file), summed over peers.
pub fn snapshots_sent_as(client_url: &str, format: &str) -> f64 {
    let label = format!("format=\"{format}\"");
    http_get(client_url, "/metrics")
        .lines()
        .filter(|l| l.starts_with("keel_network_snapshot_send_format_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// A lazily connecting client channel to `url` (1 s connect, 10 s per request).
pub fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).unwrap().connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(10)).connect_lazy()
}

/// Retries `f` until it succeeds or `limit` passes; the last error otherwise.
pub async fn retry<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

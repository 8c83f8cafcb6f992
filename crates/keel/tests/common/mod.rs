//! Helpers for tests that run real `keel` (and real `etcd`) processes on 127.0.0.1 ports.
#![allow(dead_code)]

use keel_proto::etcdserverpb::kv_client::KvClient;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A server process (keel or etcd) with its data dir and log file.
pub struct Proc {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub log: PathBuf,
    /// Where this process's output starts in the (shared, appended) log file.
    log_start: u64,
}

pub fn keel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel"))
}

/// Starts `bin` as a single member with etcd's flags; output goes to `<data_dir>.log`.
pub fn start(bin: &Path, data_dir: &Path, client_port: u16, peer_port: u16, extra: &[&str]) -> Proc {
    let log = data_dir.with_extension("log");
    let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let curl = format!("http://127.0.0.1:{client_port}");
    let purl = format!("http://127.0.0.1:{peer_port}");
    let child = Command::new(bin)
        .args(["--name", "t1", "--data-dir"])
        .arg(data_dir)
        .args(["--listen-client-urls", &curl, "--advertise-client-urls", &curl])
        .args(["--listen-peer-urls", &purl, "--initial-advertise-peer-urls", &purl])
        .args(["--initial-cluster", &format!("t1={purl}")])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn server");
    Proc { child: Some(child), data_dir: data_dir.to_path_buf(), client_port, log, log_start }
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

    /// Waits for the server's "ready to serve client requests" line, or for it to exit.
    /// Returns false if it exited.
    pub fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log_text().contains("ready to serve client requests") {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false;
                }
            }
            assert!(Instant::now() < deadline, "server did not become ready:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
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
        format!("http://127.0.0.1:{}", self.client_port)
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

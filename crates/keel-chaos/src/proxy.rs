//! A fault-injecting TCP proxy on the peer links.
//!
//! Member `i` listens for peers on `127.0.0.i:PEER` but advertises `127.0.0.i:PROXY`, where this
//! proxy forwards to it. Members dial peers from their own address
//! (`--feature-gates=SetMemberLocalAddr=true`), so the proxy knows each connection's link
//! (`from -> to`) by its source address. Faults: links blocked (partitions: existing connections
//! are cut, new ones refused), delay on every chunk, and random connection cuts (dropped
//! messages: raft resends). Works without root or network namespaces.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The member index of a 127.0.0.x address.
pub fn member_of(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(v4) => v4.octets()[3] as usize,
        IpAddr::V6(_) => 0,
    }
}

pub fn member_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, i as u8)
}

#[derive(Default)]
struct State {
    /// Links (from, to) that carry nothing.
    blocked: HashSet<(usize, usize)>,
}

/// Controls every member's proxy.
#[derive(Clone)]
pub struct Net {
    state: Arc<Mutex<State>>,
    /// Bumped on every change of `blocked`: open connections re-check their link.
    epoch: watch::Sender<u64>,
    delay_ms: Arc<AtomicU64>,
    /// Chance, in 1/10,000 per forwarded chunk, that the connection is cut.
    cut_per_10k: Arc<AtomicU64>,
    seed: Arc<AtomicU64>,
}

impl Net {
    pub fn new(seed: u64) -> Net {
        Net {
            state: Arc::default(),
            epoch: watch::channel(0).0,
            delay_ms: Arc::default(),
            cut_per_10k: Arc::default(),
            seed: Arc::new(AtomicU64::new(seed | 1)),
        }
    }

    fn blocked(&self, from: usize, to: usize) -> bool {
        self.state.lock().blocked.contains(&(from, to))
    }

    /// Blocks both directions between every member of `a` and every member of `b`.
    pub fn partition(&self, a: &[usize], b: &[usize]) {
        let mut s = self.state.lock();
        for &x in a {
            for &y in b {
                s.blocked.insert((x, y));
                s.blocked.insert((y, x));
            }
        }
        drop(s);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn heal(&self) {
        self.state.lock().blocked.clear();
        self.delay_ms.store(0, Ordering::Relaxed);
        self.cut_per_10k.store(0, Ordering::Relaxed);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::Relaxed);
    }

    pub fn set_cut_rate(&self, per_10k: u64) {
        self.cut_per_10k.store(per_10k, Ordering::Relaxed);
    }

    /// xorshift: cheap, shared, and deterministic enough for fault rates.
    fn roll(&self) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x % 10_000
    }

    /// Serves member `to`'s proxy: `listen` -> `target`.
    pub async fn serve(self, to: usize, listen: SocketAddr, target: SocketAddr) -> anyhow::Result<JoinHandle<()>> {
        let l = bind_reuse(listen)?;
        Ok(tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = l.accept().await else { continue };
                let from = member_of(peer.ip());
                let net = self.clone();
                tokio::spawn(async move {
                    if net.blocked(from, to) {
                        return;
                    }
                    let Ok(Ok(up)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await else { return };
                    let _ = conn.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (cr, cw) = conn.into_split();
                    let (ur, uw) = up.into_split();
                    let a = tokio::spawn(pump(net.clone(), from, to, cr, uw));
                    let b = tokio::spawn(pump(net.clone(), to, from, ur, cw));
                    let mut epoch = net.epoch.subscribe();
                    // Cut the connection when its link gets blocked, or when either side ends.
                    let (abort_a, abort_b) = (a.abort_handle(), b.abort_handle());
                    tokio::select! {
                        _ = a => {}
                        _ = b => {}
                        _ = async {
                            loop {
                                if epoch.changed().await.is_err() { return; }
                                if net.blocked(from, to) || net.blocked(to, from) { return; }
                            }
                        } => {}
                    }
                    abort_a.abort();
                    abort_b.abort();
                });
            }
        }))
    }
}

fn bind_reuse(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    Ok(s.listen(1024)?)
}

/// Copies one direction, applying the delay and the cut rate to each chunk.
async fn pump(net: Net, from: usize, to: usize, mut r: tokio::net::tcp::OwnedReadHalf, w: tokio::net::tcp::OwnedWriteHalf) {
    // Chunks wait in a queue until their release time, so a delay does not cut throughput.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        let mut w = w;
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if net.blocked(from, to) {
            break;
        }
        let rate = net.cut_per_10k.load(Ordering::Relaxed);
        if rate > 0 && net.roll() < rate {
            writer.abort();
            return;
        }
        let at = tokio::time::Instant::now() + Duration::from_millis(net.delay_ms.load(Ordering::Relaxed));
        if tx.send((at, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

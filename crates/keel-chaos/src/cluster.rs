//! A cluster of real `keel` processes on 127.0.0.x (or a mixed one: some members real etcd
//! processes, [`Mix`]): start, SIGKILL, SIGSTOP/SIGCONT, restart, membership changes through the
//! Cluster API, and gRPC channels to each member.
//!
//! Member `i` (1-based, never reused within a run) uses 127.0.0.i: clients on `base`, peers on
//! `base + 1`, and its proxy ([`crate::proxy`]) on `base + 2`, which is what it advertises.

use crate::proxy::{member_ip, Net};
use anyhow::{bail, Context, Result};
use keel_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::{MemberAddRequest, MemberListRequest, MemberRemoveRequest, StatusRequest};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

pub struct Member {
    pub idx: usize,
    pub child: Option<Child>,
    pub paused: bool,
    /// An etcd member (started from [`Mix::etcd`]), not a Keel one.
    pub etcd: bool,
    /// Arguments of the first start (restarts reuse them: the data dir then decides).
    args: Vec<String>,
}

/// Which members of a new cluster run etcd instead of Keel: the first `members` of them.
///
/// etcd sets no local address for peer connections on a loopback advertise URL (Keel does), so
/// an etcd member's connections leave from 127.0.0.1, which the proxy takes for m1's: the link
/// faults (partitions, bridges) hold exactly for an etcd m1 only; for other etcd members they
/// cut what reaches them but not all they send.
#[derive(Clone, Debug)]
pub struct Mix {
    pub etcd: PathBuf,
    pub members: usize,
}

pub struct Cluster {
    pub bin: PathBuf,
    /// The etcd binary of a mixed cluster.
    etcd: Option<PathBuf>,
    pub dir: PathBuf,
    pub base: u16,
    pub net: Net,
    /// Current members by index.
    pub members: BTreeMap<usize, Member>,
    pub next_idx: usize,
    /// Extra flags for every member.
    pub extra: Vec<String>,
    /// The members' proxies (listening until the cluster shuts down).
    proxies: Vec<tokio::task::JoinHandle<()>>,
    /// keel-powerfs: each member's data dir on a power-loss filesystem of its own.
    power: Option<PathBuf>,
    disks: BTreeMap<usize, crate::powerfs::Disk>,
    /// Failpoints armed in every start of a Keel member (a negative control), besides those of
    /// a restart.
    always: Option<String>,
}

pub fn client_url(idx: usize, base: u16) -> String {
    format!("http://{}:{base}", member_ip(idx))
}

fn peer_url(idx: usize, base: u16) -> String {
    format!("http://{}:{}", member_ip(idx), base + 2)
}

pub fn channel(idx: usize, base: u16) -> Result<Channel> {
    Ok(Endpoint::from_shared(client_url(idx, base))?.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(5)).connect_lazy())
}

impl Cluster {
    pub async fn start(bin: &Path, dir: &Path, base: u16, n: usize, net: Net, extra: Vec<String>, power: Option<&Path>) -> Result<Cluster> {
        Cluster::start_mixed(bin, None, dir, base, n, net, extra, power, None).await
    }

    /// A cluster of `n` members of which `mix.members` (the first ones) run etcd.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_mixed(
        bin: &Path,
        mix: Option<&Mix>,
        dir: &Path,
        base: u16,
        n: usize,
        net: Net,
        extra: Vec<String>,
        power: Option<&Path>,
        always: Option<String>,
    ) -> Result<Cluster> {
        std::fs::create_dir_all(dir)?;
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            etcd: mix.map(|m| m.etcd.clone()),
            dir: dir.to_path_buf(),
            base,
            net,
            members: BTreeMap::new(),
            next_idx: 1,
            extra,
            proxies: Vec::new(),
            power: power.map(Path::to_path_buf),
            disks: BTreeMap::new(),
            always,
        };
        let initial: Vec<String> = (1..=n).map(|i| format!("m{i}={}", peer_url(i, base))).collect();
        let initial = initial.join(",");
        let etcd_members = mix.map_or(0, |m| m.members);
        for i in 1..=n {
            c.spawn_member(i, &initial, "new", i <= etcd_members).await?;
        }
        c.next_idx = n + 1;
        for i in 1..=n {
            c.wait_healthy(i, Duration::from_secs(30)).await?;
        }
        Ok(c)
    }

    async fn spawn_member(&mut self, i: usize, initial: &str, state: &str, etcd: bool) -> Result<()> {
        let ip = member_ip(i);
        let dir = match &self.power {
            Some(pfs) => {
                let mnt = self.dir.join(format!("m{i}.disk"));
                self.disks.insert(i, crate::powerfs::Disk::mount(pfs, &mnt)?);
                mnt.join("data")
            }
            None => self.dir.join(format!("m{i}")),
        };
        let mut args: Vec<String> = vec![
            "--name".into(),
            format!("m{i}"),
            "--data-dir".into(),
            dir.to_string_lossy().into_owned(),
            "--listen-client-urls".into(),
            client_url(i, self.base),
            "--advertise-client-urls".into(),
            client_url(i, self.base),
            "--listen-peer-urls".into(),
            format!("http://{ip}:{}", self.base + 1),
            "--initial-advertise-peer-urls".into(),
            peer_url(i, self.base),
            "--initial-cluster".into(),
            initial.to_string(),
            "--initial-cluster-state".into(),
            state.into(),
            "--initial-cluster-token".into(),
            "chaos".into(),
        ];
        // Peer connections leave from the member's own address (the proxy tells links apart by
        // it); etcd 3.6 takes only the feature gate, as Keel does too; etcd 3.5 has neither the
        // gate nor the flag (its links are told apart as loosely as an etcd member on loopback).
        if !etcd || self.etcd.as_deref().is_some_and(etcd_has_feature_gates) {
            args.push("--feature-gates=SetMemberLocalAddr=true".into());
        }
        args.extend(self.extra.iter().cloned());
        let target: SocketAddr = format!("{ip}:{}", self.base + 1).parse()?;
        let listen: SocketAddr = format!("{ip}:{}", self.base + 2).parse()?;
        let proxy = self.net.clone().serve(i, listen, target).await.with_context(|| format!("proxy for m{i} on {listen}"))?;
        self.proxies.push(proxy);
        let mut m = Member { idx: i, child: None, paused: false, etcd, args };
        m.child = Some(self.spawn(&m, None)?);
        self.members.insert(i, m);
        Ok(())
    }

    fn spawn(&self, m: &Member, failpoints: Option<&str>) -> Result<Child> {
        let log = self.dir.join(format!("m{}.log", m.idx));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let bin = match (&self.etcd, m.etcd) {
            (Some(etcd), true) => etcd,
            _ => &self.bin,
        };
        let mut cmd = Command::new(bin);
        cmd.args(&m.args).stdin(Stdio::null()).stdout(out).stderr(err).env("RUST_BACKTRACE", "0");
        let armed: Vec<&str> = self.always.as_deref().into_iter().chain(failpoints).collect();
        if !armed.is_empty() && !m.etcd {
            cmd.env("FAILPOINTS", armed.join(";"));
        }
        cmd.spawn().with_context(|| format!("spawn {}", bin.display()))
    }

    /// Whether member `i` runs etcd.
    pub fn is_etcd(&self, i: usize) -> bool {
        self.members.get(&i).is_some_and(|m| m.etcd)
    }

    /// The members as `m1 (etcd), m2, ...`.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.members.values().map(|m| format!("m{}{}", m.idx, if m.etcd { " (etcd)" } else { "" })).collect();
        names.join(", ")
    }

    pub fn ids(&self) -> Vec<usize> {
        self.members.keys().copied().collect()
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        let Some(m) = self.members.get_mut(&i) else { return false };
        match m.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(m) = self.members.get_mut(&i) {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            m.paused = false;
        }
    }

    /// Whether members' data is on power-loss filesystems.
    pub fn has_power(&self) -> bool {
        self.power.is_some()
    }

    /// The power of member `i` goes: SIGKILL, then what it had not fsynced is gone.
    pub fn power_cut(&mut self, i: usize) -> Result<String> {
        self.kill(i);
        match self.disks.get_mut(&i) {
            Some(d) => d.cut(),
            None => bail!("m{i} has no power-loss disk"),
        }
    }

    /// Sends a control command to member `i`'s power-loss filesystem (faults: see
    /// keel-powerfs's `control`).
    pub fn disk_command(&mut self, i: usize, cmd: &str) -> Result<String> {
        match self.disks.get_mut(&i) {
            Some(d) => d.command(cmd),
            None => bail!("m{i} has no power-loss disk"),
        }
    }

    /// Copies each member's data off its power-loss filesystem into `to/m{i}` (the filesystems
    /// go with the cluster).
    pub fn keep_disks(&self, to: &Path) {
        for i in self.disks.keys() {
            let _ =
                Command::new("cp").arg("-a").arg(self.dir.join(format!("m{i}.disk")).join("data")).arg(to.join(format!("m{i}"))).status();
        }
    }

    pub fn signal(&mut self, i: usize, sig: i32) {
        if let Some(m) = self.members.get_mut(&i) {
            if let Some(c) = &m.child {
                // SAFETY: sends a signal to our own child process by pid; no memory involved.
                unsafe {
                    libc::kill(c.id() as i32, sig);
                }
                m.paused = sig == libc::SIGSTOP;
            }
        }
    }

    /// Starts a stopped member again, optionally with crash points armed.
    pub fn restart(&mut self, i: usize, failpoints: Option<&str>) -> Result<()> {
        let Some(m) = self.members.get(&i) else { bail!("no member {i}") };
        if m.child.is_some() {
            return Ok(());
        }
        let child = self.spawn(m, failpoints)?;
        if let Some(m) = self.members.get_mut(&i) {
            m.child = Some(child);
        }
        Ok(())
    }

    /// Every member running, none paused, links healed.
    pub fn heal_all(&mut self) -> Result<()> {
        self.net.heal();
        for i in self.ids() {
            if self.members.get(&i).is_some_and(|m| m.paused) {
                self.signal(i, libc::SIGCONT);
            }
            if !self.is_running(i) {
                if let Some(m) = self.members.get_mut(&i) {
                    m.child = None;
                }
                self.restart(i, None)?;
            }
        }
        Ok(())
    }

    pub async fn wait_healthy(&self, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(ch) = channel(i, self.base) {
                let mut m = MaintenanceClient::new(ch);
                if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), m.status(StatusRequest {})).await {
                    if r.get_ref().leader != 0 {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("member m{i} not healthy after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader's index, as some reachable member reports it.
    pub async fn leader(&self) -> Option<usize> {
        for &i in self.members.keys() {
            let Ok(ch) = channel(i, self.base) else { continue };
            let mut m = MaintenanceClient::new(ch);
            let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), m.status(StatusRequest {})).await else { continue };
            let leader = r.get_ref().leader;
            if leader == 0 {
                continue;
            }
            let mut cl = ClusterClient::new(channel(i, self.base).ok()?);
            let Ok(Ok(list)) =
                tokio::time::timeout(Duration::from_millis(500), cl.member_list(MemberListRequest { linearizable: false })).await
            else {
                continue;
            };
            for m in &list.get_ref().members {
                if m.id == leader {
                    return m.name.strip_prefix('m').and_then(|s| s.parse().ok());
                }
            }
        }
        None
    }

    /// Removes member `i` through the Cluster API (asked of another member) and stops it.
    pub async fn remove_member(&mut self, i: usize) -> Result<()> {
        let others: Vec<usize> = self.ids().into_iter().filter(|&j| j != i).collect();
        let mut last_err = anyhow::anyhow!("no other member");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.try_remove(i, &others).await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = e,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last_err)
    }

    async fn try_remove(&mut self, i: usize, others: &[usize]) -> Result<()> {
        let mut last_err = anyhow::anyhow!("no other member");
        for &j in others {
            let mut cl = ClusterClient::new(channel(j, self.base)?);
            let list = match tokio::time::timeout(Duration::from_secs(3), cl.member_list(MemberListRequest { linearizable: true })).await {
                Ok(Ok(l)) => l.into_inner(),
                Ok(Err(e)) => {
                    last_err = e.into();
                    continue;
                }
                Err(_) => continue,
            };
            let Some(id) =
                list.members.iter().find(|m| m.name == format!("m{i}") || m.peer_ur_ls.contains(&peer_url(i, self.base))).map(|m| m.id)
            else {
                // An earlier attempt went through after all.
                self.kill(i);
                self.members.remove(&i);
                return Ok(());
            };
            match tokio::time::timeout(Duration::from_secs(5), cl.member_remove(MemberRemoveRequest { id })).await {
                Ok(Ok(_)) => {
                    self.kill(i);
                    self.members.remove(&i);
                    return Ok(());
                }
                Ok(Err(e)) => last_err = e.into(),
                Err(_) => last_err = anyhow::anyhow!("member remove timed out"),
            }
        }
        Err(last_err)
    }

    /// Adds a fresh member (new index, empty data dir; an etcd one if `etcd`) through the
    /// Cluster API and starts it.
    pub async fn add_member(&mut self, etcd: bool) -> Result<usize> {
        let i = self.next_idx;
        let url = peer_url(i, self.base);
        let mut added = None;
        let mut last_err = String::from("no member answered");
        // Strict reconfiguration refuses an add until the members have been connected a while
        // (as etcd: 5 s after a member came back): retry.
        let deadline = Instant::now() + Duration::from_secs(30);
        'outer: while Instant::now() < deadline {
            for j in self.ids() {
                let mut cl = ClusterClient::new(channel(j, self.base)?);
                let req = MemberAddRequest { peer_ur_ls: vec![url.clone()], is_learner: false };
                match tokio::time::timeout(Duration::from_secs(5), cl.member_add(req)).await {
                    Ok(Ok(r)) => {
                        added = Some(r.into_inner());
                        break 'outer;
                    }
                    Ok(Err(e)) => last_err = e.message().to_string(),
                    Err(_) => last_err = "timed out".into(),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let Some(resp) = added else { bail!("member add failed: {last_err}") };
        self.next_idx += 1;
        let mut initial: Vec<String> = Vec::new();
        for m in &resp.members {
            let name = if m.peer_ur_ls.contains(&url) { format!("m{i}") } else { m.name.clone() };
            for u in &m.peer_ur_ls {
                initial.push(format!("{name}={u}"));
            }
        }
        self.spawn_member(i, &initial.join(","), "existing", etcd && self.etcd.is_some()).await?;
        Ok(i)
    }

    /// Stops every member and closes the proxies' listeners (the next cluster reuses the ports).
    pub async fn shutdown(&mut self) {
        self.stop_all();
        for p in self.proxies.drain(..) {
            p.abort();
            let _ = p.await;
        }
    }

    pub fn stop_all(&mut self) {
        for i in self.ids() {
            if self.members.get(&i).is_some_and(|m| m.paused) {
                self.signal(i, libc::SIGCONT);
            }
            self.kill(i);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        for p in &self.proxies {
            p.abort();
        }
    }
}

/// True when the etcd binary at `bin` takes `--feature-gates` (3.6 and later).
fn etcd_has_feature_gates(bin: &std::path::Path) -> bool {
    let out = std::process::Command::new(bin).arg("--version").output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    !text.contains("etcd Version: 3.5.") && !text.contains("etcd Version: 3.4.")
}

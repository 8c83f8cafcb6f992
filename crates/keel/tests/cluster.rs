//! Multi-member behaviour with real processes on 127.0.0.x: leader loss under load, a minority
//! partition, a new member catching up by snapshot, and a full restart.
//!
//! Each member advertises its peer URL through a small TCP proxy owned by the test, and dials
//! its peers from its own address (`--experimental-set-member-localaddr`), so the test can cut a
//! member's peer traffic in both directions.

mod common;

use common::*;
use keel_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::{
    watch_request, HashKvRequest, MemberAddRequest, PutRequest, RangeRequest, StatusRequest, WatchCreateRequest, WatchRequest,
};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

const HEARTBEAT_MS: u64 = 50;
const ELECTION_MS: u64 = 500;

/// The tests in this file run one at a time: each starts several processes on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Default)]
struct ProxyState {
    blocked_all: bool,
    blocked_src: HashSet<IpAddr>,
    conns: Vec<(IpAddr, tokio::task::AbortHandle)>,
}

/// A TCP proxy in front of one member's peer listener that can drop traffic.
#[derive(Clone)]
struct Proxy {
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    async fn start(listen: (IpAddr, u16), target: (IpAddr, u16)) -> Proxy {
        let l = TcpListener::bind(listen).await.expect("proxy bind");
        let p = Proxy { state: Arc::default() };
        let st = p.state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, from)) = l.accept().await else { continue };
                let src = from.ip();
                {
                    let s = st.lock();
                    if s.blocked_all || s.blocked_src.contains(&src) {
                        continue; // dropped: the connection closes
                    }
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let mut inbound = inbound;
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                st.lock().conns.push((src, h.abort_handle()));
            }
        });
        p
    }

    /// Cuts all traffic into this member, or only traffic from `src`.
    fn block(&self, src: Option<IpAddr>) {
        let mut s = self.state.lock();
        match src {
            None => s.blocked_all = true,
            Some(ip) => {
                s.blocked_src.insert(ip);
            }
        }
        let all = s.blocked_all;
        let srcs = s.blocked_src.clone();
        s.conns.retain(|(ip, h)| {
            if all || srcs.contains(ip) {
                h.abort();
                false
            } else {
                true
            }
        });
    }

    fn heal(&self) {
        let mut s = self.state.lock();
        s.blocked_all = false;
        s.blocked_src.clear();
    }
}

struct Member {
    name: String,
    ip: IpAddr,
    client_port: u16,
    peer_port: u16,
    proxy_port: u16,
    dir: PathBuf,
    proxy: Option<Proxy>,
    proc: Option<Proc>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }
    fn advertised_peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.proxy_port)
    }
}

struct Cluster {
    _tmp: tempfile::TempDir,
    members: Vec<Member>,
}

impl Cluster {
    async fn start(n: usize, extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        for i in 0..n {
            let ip: IpAddr = format!("127.0.0.{}", i + 1).parse().unwrap();
            members.push(Member {
                name: format!("m{i}"),
                ip,
                client_port: free_port(),
                peer_port: free_port(),
                proxy_port: free_port(),
                dir: tmp.path().join(format!("m{i}.etcd")),
                proxy: None,
                proc: None,
            });
        }
        let mut c = Cluster { _tmp: tmp, members };
        for i in 0..n {
            let m = &mut c.members[i];
            m.proxy = Some(Proxy::start((m.ip, m.proxy_port), (m.ip, m.peer_port)).await);
        }
        let ic = c.initial_cluster();
        for i in 0..n {
            c.spawn(i, &ic, "new", extra);
        }
        for i in 0..n {
            let p = c.members[i].proc.as_mut().unwrap();
            assert!(p.wait_ready(), "member {i} did not start:\n{}", p.log_text());
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.members.iter().map(|m| format!("{}={}", m.name, m.advertised_peer_url())).collect::<Vec<_>>().join(",")
    }

    fn spawn(&mut self, i: usize, initial_cluster: &str, state: &str, extra: &[&str]) {
        let m = &self.members[i];
        let mut args: Vec<String> = vec![
            "--name".into(),
            m.name.clone(),
            "--data-dir".into(),
            m.dir.to_string_lossy().into_owned(),
            "--listen-client-urls".into(),
            m.client_url(),
            "--advertise-client-urls".into(),
            m.client_url(),
            "--listen-peer-urls".into(),
            format!("http://{}:{}", m.ip, m.peer_port),
            "--initial-advertise-peer-urls".into(),
            m.advertised_peer_url(),
            "--initial-cluster".into(),
            initial_cluster.into(),
            "--initial-cluster-state".into(),
            state.into(),
            "--initial-cluster-token".into(),
            "cluster-test".into(),
            "--heartbeat-interval".into(),
            HEARTBEAT_MS.to_string(),
            "--election-timeout".into(),
            ELECTION_MS.to_string(),
            "--experimental-set-member-localaddr".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = spawn(&keel_bin(), &m.dir, &m.client_url(), &args);
        self.members[i].proc = Some(p);
    }

    fn restart(&mut self, i: usize, extra: &[&str]) {
        let ic = self.initial_cluster();
        self.spawn(i, &ic, "new", extra);
        let p = self.members[i].proc.as_mut().unwrap();
        assert!(p.wait_ready(), "member {i} did not restart:\n{}", p.log_text());
    }

    async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(channel(&self.members[i].client_url()).await)
    }

    /// Index of the member that leads, as the members themselves report (waits for one).
    async fn leader(&self, among: &[usize]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for &i in among {
                if let Ok(ch) = Channel::from_shared(self.members[i].client_url()).unwrap().connect().await {
                    if let Ok(s) = MaintenanceClient::new(ch).status(StatusRequest {}).await {
                        let s = s.into_inner();
                        if s.leader != 0 && s.leader == s.header.unwrap().member_id {
                            return i;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader among {among:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The sum of every series of counter or gauge `family` on `client_url`'s `/metrics`.
fn metric_sum(client_url: &str, family: &str) -> f64 {
    http_get(client_url, "/metrics")
        .lines()
        .filter(|l| l.strip_prefix(family).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Snapshots member `i` has received from a leader (etcd's counter).
fn snapshots_received(c: &Cluster, i: usize) -> f64 {
    metric_sum(&c.members[i].client_url(), "etcd_network_snapshot_receive_success")
}

/// Member `i`'s raft index now (its Status).
async fn raft_index(c: &Cluster, i: usize) -> u64 {
    MaintenanceClient::new(channel(&c.members[i].client_url()).await).status(StatusRequest {}).await.unwrap().into_inner().raft_index
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).unwrap().connect_timeout(Duration::from_secs(1)).connect_lazy()
}

async fn count_prefix(kv: &mut KvClient<Channel>, prefix: &str, serializable: bool) -> Result<i64, tonic::Status> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    let r = kv.range(RangeRequest { key: prefix.into(), range_end: end, count_only: true, serializable, ..Default::default() }).await?;
    Ok(r.into_inner().count)
}

/// Puts `n` keys `prefix{i}` through `clients` concurrent clients spread over `targets`.
async fn load(c: &Cluster, targets: &[usize], prefix: &str, n: usize, clients: usize) {
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut kv = c.kv(targets[w % targets.len()]).await;
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let key = format!("{prefix}{i:08}");
                kv.put(PutRequest { key: key.into(), value: vec![b'v'; 64], ..Default::default() }).await?;
                i += clients;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            let logs: Vec<String> = c
                .members
                .iter()
                .filter_map(|m| m.proc.as_ref())
                .map(|p| p.log_text().lines().filter(|l| !l.contains("\"level\":\"info\"")).take(60).collect::<Vec<_>>().join("\n"))
                .collect();
            panic!("put failed: {e}\nmember logs (warnings and errors):\n{}", logs.join("\n---\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_under_load_loses_nothing() {
    let _g = SERIAL.lock().await;
    let mut c = Cluster::start(3, &[]).await;
    let leader = c.leader(&[0, 1, 2]).await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    // Writers on every member; every acknowledged key is recorded.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..6 {
        let urls: Vec<String> = c.members.iter().map(|m| m.client_url()).collect();
        let acked = acked.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut clients = Vec::new();
            for u in &urls {
                clients.push(KvClient::new(channel(u).await));
            }
            let mut i = 0u64;
            let mut target = w % clients.len();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load/{w}/{i:08}");
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    clients[target].put(PutRequest { key: key.clone().into(), value: b"x".to_vec(), ..Default::default() }),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {
                        acked.lock().push(key);
                        i += 1;
                    }
                    _ => {
                        // Unknown outcome: move on to another member and a new key.
                        target = (target + 1) % clients.len();
                        i += 1;
                    }
                }
            }
        }));
    }
    while acked.lock().len() < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = Instant::now();
    c.members[leader].proc.as_mut().unwrap().sigkill();
    let before = acked.lock().len();

    // A new leader serves writes (how long it took is printed, not asserted: a timed bound
    // would only measure how loaded the machine is; `c.leader` gives up after 20 s).
    let new_leader = c.leader(&survivors).await;
    let mut kv = c.kv(new_leader).await;
    kv.put(PutRequest { key: b"after-failover".to_vec(), value: b"1".to_vec(), ..Default::default() }).await.expect("write after failover");
    println!("failover: a write on the new leader {:?} after the kill", killed_at.elapsed());
    while acked.lock().len() < before + 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // Every acknowledged write is on the survivors, and on the old leader once it is back.
    let acked: Vec<String> = acked.lock().clone();
    c.restart(leader, &[]);
    for i in 0..3 {
        let mut kv = c.kv(i).await;
        if i == leader {
            // Wait for the restarted member to catch up, then read locally.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let mut lkv = c.kv(new_leader).await;
                let want = count_prefix(&mut lkv, "load/", false).await.unwrap();
                if count_prefix(&mut kv, "load/", true).await.unwrap_or(0) >= want {
                    break;
                }
                assert!(Instant::now() < deadline, "restarted member did not catch up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let r = kv
            .range(RangeRequest {
                key: b"load/".to_vec(),
                range_end: b"load0".to_vec(),
                keys_only: true,
                serializable: i == leader,
                ..Default::default()
            })
            .await
            .unwrap();
        let have: HashSet<Vec<u8>> = r.into_inner().kvs.into_iter().map(|kv| kv.key).collect();
        for k in &acked {
            assert!(have.contains(k.as_bytes()), "member {i} lost acknowledged write {k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_partition_fails_instead_of_serving_stale_data() {
    let _g = SERIAL.lock().await;
    let c = Cluster::start(3, &[]).await;
    let leader = c.leader(&[0, 1, 2]).await;
    // Isolate one follower.
    let iso = (0..3).find(|i| *i != leader).unwrap();
    let majority: Vec<usize> = (0..3).filter(|i| *i != iso).collect();
    let mut kv_iso = c.kv(iso).await;
    kv_iso.put(PutRequest { key: b"p".to_vec(), value: b"before".to_vec(), ..Default::default() }).await.unwrap();
    let iso_ip = c.members[iso].ip;
    c.members[iso].proxy.as_ref().unwrap().block(None);
    for &i in &majority {
        c.members[i].proxy.as_ref().unwrap().block(Some(iso_ip));
    }

    // The majority keeps serving.
    let mut kv_maj = c.kv(majority[0]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match kv_maj.put(PutRequest { key: b"p".to_vec(), value: b"during".to_vec(), ..Default::default() }).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "majority stopped serving: {e}"),
        }
    }
    // The isolated member refuses linearizable reads and writes instead of answering stale data.
    let r = tokio::time::timeout(Duration::from_secs(20), kv_iso.range(RangeRequest { key: b"p".to_vec(), ..Default::default() })).await;
    match r {
        Ok(Ok(resp)) => panic!("isolated member served a linearizable read: {:?}", resp.into_inner().kvs),
        Ok(Err(_)) => {}
        Err(_) => panic!("isolated member hung on a linearizable read"),
    }
    let w = tokio::time::timeout(
        Duration::from_secs(20),
        kv_iso.put(PutRequest { key: b"q".to_vec(), value: b"x".to_vec(), ..Default::default() }),
    )
    .await;
    assert!(matches!(w, Ok(Err(_))), "isolated member accepted a write: {w:?}");

    // Heal: the member rejoins and sees the majority's write.
    for m in &c.members {
        m.proxy.as_ref().unwrap().heal();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = kv_iso.range(RangeRequest { key: b"p".to_vec(), ..Default::default() }).await {
            let r = r.into_inner();
            if r.kvs.first().map(|kv| kv.value.as_slice()) == Some(b"during") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "isolated member did not rejoin:\n{}", c.members[iso].proc.as_ref().unwrap().log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_member_catches_up_by_snapshot_with_equal_hashkv() {
    let _g = SERIAL.lock().await;
    let n: usize = std::env::var("KEEL_CATCHUP_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let mut c = Cluster::start(3, &["--snapshot-count", "1000"]).await;
    load(&c, &[0, 1, 2], "bulk/", n, 64).await;

    // Add a fourth member; it starts far behind the leader's retained log.
    let ip: IpAddr = "127.0.0.4".parse().unwrap();
    let tmp_dir = c.members[0].dir.parent().unwrap().join("m3.etcd");
    c.members.push(Member {
        name: "m3".into(),
        ip,
        client_port: free_port(),
        peer_port: free_port(),
        proxy_port: free_port(),
        dir: tmp_dir,
        proxy: None,
        proc: None,
    });
    {
        let m = c.members.last_mut().unwrap();
        m.proxy = Some(Proxy::start((m.ip, m.proxy_port), (m.ip, m.peer_port)).await);
    }
    let mut cl = ClusterClient::new(channel(&c.members[0].client_url()).await);
    // Strict reconfiguration waits for peers connected for 5 s; retry until then.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match cl.member_add(MemberAddRequest { peer_ur_ls: vec![c.members[3].advertised_peer_url()], is_learner: false }).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "member add failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let ic = c.initial_cluster();
    c.spawn(3, &ic, "existing", &["--snapshot-count", "1000"]);
    let ready = c.members[3].proc.as_mut().unwrap().wait_ready_for(Duration::from_secs(30)) == Some(true);
    if !ready {
        let others: String = c.members[..3]
            .iter()
            .map(|m| {
                m.proc
                    .as_ref()
                    .unwrap()
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("snapshot") || l.contains("member"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n---\n");
        panic!("new member did not start:\n{}\nothers:\n{others}", c.members[3].proc.as_ref().unwrap().log_text());
    }
    assert!(snapshots_received(&c, 3) >= 1.0, "the new member did not catch up by snapshot");

    let mut kv_new = c.kv(3).await;
    assert_eq!(count_prefix(&mut kv_new, "bulk/", true).await.unwrap(), n as i64);
    // Same revision, same hash on every member.
    let mut kv0 = c.kv(0).await;
    let rev = kv0
        .range(RangeRequest { key: b"bulk/".to_vec(), count_only: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let mut hashes = Vec::new();
    for m in &c.members {
        let mut mc = MaintenanceClient::new(channel(&m.client_url()).await);
        let deadline = Instant::now() + Duration::from_secs(10);
        let h = loop {
            match mc.hash_kv(HashKvRequest { revision: rev }).await {
                Ok(h) => break h.into_inner().hash,
                Err(e) => {
                    assert!(Instant::now() < deadline, "hashkv on {}: {e}", m.name);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        hashes.push(h);
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "HashKV differs across members: {hashes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restart_keeps_all_data() {
    let _g = SERIAL.lock().await;
    let mut c = Cluster::start(3, &[]).await;
    load(&c, &[0, 1, 2], "r/", 2000, 16).await;
    for m in c.members.iter_mut() {
        m.proc.as_mut().unwrap().sigkill();
    }
    let ic = c.initial_cluster();
    for i in 0..3 {
        c.spawn(i, &ic, "new", &[]);
    }
    for i in 0..3 {
        let p = c.members[i].proc.as_mut().unwrap();
        assert!(p.wait_ready(), "member {i} did not restart:\n{}", p.log_text());
    }
    for i in 0..3 {
        let mut kv = c.kv(i).await;
        assert_eq!(count_prefix(&mut kv, "r/", false).await.unwrap(), 2000, "member {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expires_on_time_across_a_leader_change() {
    use keel_proto::etcdserverpb::lease_client::LeaseClient;
    use keel_proto::etcdserverpb::watch_client::WatchClient;
    use keel_proto::etcdserverpb::{LeaseGrantRequest, WatchCreateRequest, WatchRequest};
    let _g = SERIAL.lock().await;
    let mut c = Cluster::start(3, &[]).await;
    let leader = c.leader(&[0, 1, 2]).await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    // Watch the lease's keys on both survivors.
    let mut streams = Vec::new();
    for &i in &survivors {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WatchRequest {
            request_union: Some(keel_proto::etcdserverpb::watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"leased/".to_vec(),
                range_end: b"leased0".to_vec(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut s = WatchClient::new(channel(&c.members[i].client_url()).await)
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(s.message().await.unwrap().unwrap().created);
        streams.push((tx, s));
    }
    let mut lc = LeaseClient::new(channel(&c.members[leader].client_url()).await);
    let granted = Instant::now();
    let id = lc.lease_grant(LeaseGrantRequest { ttl: 10, id: 0 }).await.unwrap().into_inner().id;
    let mut kv = c.kv(leader).await;
    for k in ["leased/a", "leased/b"] {
        kv.put(PutRequest { key: k.into(), value: b"v".to_vec(), lease: id, ..Default::default() }).await.unwrap();
    }
    for (_, s) in streams.iter_mut() {
        let r = s.message().await.unwrap().unwrap();
        assert_eq!(r.events.len(), 1);
        let r = s.message().await.unwrap().unwrap();
        assert_eq!(r.events.len(), 1);
    }
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(granted.elapsed())).await;
    c.members[leader].proc.as_mut().unwrap().sigkill();

    // Both survivors see both keys deleted, in one revision, the same on both.
    let mut revs = Vec::new();
    for (_, s) in streams.iter_mut() {
        let r = tokio::time::timeout(Duration::from_secs(20), s.message()).await.expect("lease never expired").unwrap().unwrap();
        let at = granted.elapsed();
        assert_eq!(r.events.len(), 2, "the lease's keys are deleted in one revision");
        revs.push(r.events[0].kv.as_ref().unwrap().mod_revision);
        // Never before its TTL (a safety bound: a loaded machine only makes it later); how much
        // later is printed (the 20 s wait above bounds it).
        assert!(at >= Duration::from_secs(10), "lease revoked early: {at:?} after grant");
        println!("lease expiry: revoked {at:?} after its grant (TTL 10 s)");
    }
    assert_eq!(revs[0], revs[1], "members deleted the keys at different revisions");
}

/// Watch guarantees against a model: random puts, deletes, txns and compactions on a 3-member
/// cluster, watchers on random members starting at random revisions with random cancels. The
/// expected events of every revision are derived from the store itself (a read of the whole
/// key space at each revision, diffed with the previous one) before compaction removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_streams_match_the_store_history() {
    use keel_proto::etcdserverpb::watch_client::WatchClient;
    use keel_proto::etcdserverpb::{
        request_op, CompactionRequest, DeleteRangeRequest, RequestOp, TxnRequest, WatchCancelRequest, WatchCreateRequest, WatchRequest,
        WatchResponse,
    };
    use keel_proto::mvccpb::{event::EventType, KeyValue};
    use std::collections::BTreeMap;

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }
    let _g = SERIAL.lock().await;
    let c = Cluster::start(3, &[]).await;
    let mut rng = Rng(0x5eed_1234_abcd);
    let key = |r: &mut Rng| format!("m/{}", r.below(8));

    // state[r] = the key space at revision r; expected[r] = the events of revision r.
    let mut state: BTreeMap<i64, BTreeMap<Vec<u8>, KeyValue>> = BTreeMap::new();
    let mut expected: BTreeMap<i64, Vec<(i32, KeyValue, Option<KeyValue>)>> = BTreeMap::new();
    let mut kv0 = c.kv(0).await;
    let base = kv0.range(RangeRequest { key: b"m/".to_vec(), range_end: b"m0".to_vec(), ..Default::default() }).await.unwrap().into_inner();
    let base_rev = base.header.unwrap().revision;
    state.insert(base_rev, base.kvs.into_iter().map(|k| (k.key.clone(), k)).collect());
    let mut read_up_to = base_rev;
    let mut compacted = 0i64;

    // Watchers: (task handle, start revision, prev_kv, compaction revision at start).
    let mut watchers: Vec<(tokio::task::JoinHandle<Vec<WatchResponse>>, i64, bool)> = Vec::new();
    for phase in 0..6 {
        // Writes.
        for _ in 0..60 {
            let mut kv = c.kv(rng.below(3) as usize).await;
            match rng.below(10) {
                0..=4 => {
                    let k = key(&mut rng);
                    kv.put(PutRequest { key: k.into(), value: format!("v{}", rng.below(100)).into(), ..Default::default() }).await.unwrap();
                }
                5..=6 => {
                    let k = key(&mut rng);
                    let end = if rng.below(2) == 0 { vec![] } else { b"m0".to_vec() };
                    kv.delete_range(DeleteRangeRequest { key: k.into(), range_end: end, ..Default::default() }).await.unwrap();
                }
                _ => {
                    let (a, b) = (rng.below(4), 4 + rng.below(4));
                    let ops = vec![
                        RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: format!("m/{a}").into(),
                                value: b"t".to_vec(),
                                ..Default::default()
                            })),
                        },
                        RequestOp {
                            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                                key: format!("m/{b}").into(),
                                ..Default::default()
                            })),
                        },
                    ];
                    kv.txn(TxnRequest { success: ops, ..Default::default() }).await.unwrap();
                }
            }
        }
        // Read the new history back from the store, revision by revision.
        let cur = kv0
            .range(RangeRequest { key: b"m/".to_vec(), range_end: b"m0".to_vec(), count_only: true, ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .header
            .unwrap()
            .revision;
        for r in read_up_to + 1..=cur {
            let snap = kv0
                .range(RangeRequest { key: b"m/".to_vec(), range_end: b"m0".to_vec(), revision: r, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            let now: BTreeMap<Vec<u8>, KeyValue> = snap.kvs.into_iter().map(|k| (k.key.clone(), k)).collect();
            let before = state.get(&(r - 1)).cloned().unwrap_or_default();
            let mut evs = Vec::new();
            for (k, v) in &now {
                if v.mod_revision == r {
                    evs.push((EventType::Put as i32, v.clone(), before.get(k).cloned()));
                }
            }
            for (k, v) in &before {
                if !now.contains_key(k) {
                    evs.push((
                        EventType::Delete as i32,
                        KeyValue { key: k.clone(), mod_revision: r, ..Default::default() },
                        Some(v.clone()),
                    ));
                }
            }
            if !evs.is_empty() {
                expected.insert(r, evs);
            }
            state.insert(r, now);
        }
        read_up_to = cur;

        // New watchers at random revisions (some already compacted away), some cancelled early.
        for _ in 0..3 {
            let start = 1 + rng.below(cur as u64) as i64;
            let prev = rng.below(2) == 0;
            let cancel_after = if rng.below(3) == 0 { Some(1 + rng.below(20) as usize) } else { None };
            let url = c.members[rng.below(3) as usize].client_url();
            let h = tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tx.send(WatchRequest {
                    request_union: Some(keel_proto::etcdserverpb::watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                        key: b"m/".to_vec(),
                        range_end: b"m0".to_vec(),
                        start_revision: start,
                        prev_kv: prev,
                        ..Default::default()
                    })),
                })
                .await
                .unwrap();
                let mut s = WatchClient::new(channel(&url).await)
                    .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                let mut got = Vec::new();
                let mut events = 0;
                // Until idle (everything written was delivered) or cancelled.
                while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(3), s.message()).await {
                    events += r.events.len();
                    let stop = r.canceled;
                    got.push(r);
                    if stop {
                        break;
                    }
                    if cancel_after.map(|n| events >= n).unwrap_or(false) {
                        let cancel =
                            keel_proto::etcdserverpb::watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id: 0 });
                        let _ = tx.send(WatchRequest { request_union: Some(cancel) }).await;
                    }
                }
                got
            });
            watchers.push((h, start, prev));
        }
        // Compact sometimes, behind what has been read back.
        if phase % 2 == 1 {
            let at = read_up_to - 30;
            if at > compacted {
                kv0.compact(CompactionRequest { revision: at, physical: rng.below(2) == 0 }).await.unwrap();
                compacted = at;
            }
        }
    }

    let last = read_up_to;
    for (h, start, prev) in watchers {
        let got = h.await.unwrap();
        assert!(got.first().map(|r| r.created).unwrap_or(false), "no created response");
        let mut next = start;
        let mut cancelled = false;
        for r in &got[1..] {
            assert!(!cancelled, "a response after cancellation");
            if r.canceled {
                cancelled = true;
                if r.compact_revision != 0 {
                    assert!(r.compact_revision >= next, "compaction cancel at {} while {} was still deliverable", r.compact_revision, next);
                }
                continue;
            }
            // A response carries whole revisions in order (a catch-up batch several, as etcd's):
            // each revision is checked on its own.
            let mut groups: Vec<(i64, Vec<&keel_proto::mvccpb::Event>)> = Vec::new();
            for e in &r.events {
                let rev = e.kv.as_ref().unwrap().mod_revision;
                match groups.last_mut() {
                    Some((g, evs)) if *g == rev => evs.push(e),
                    _ => groups.push((rev, vec![e])),
                }
            }
            for (rev, evs) in groups {
                assert!(rev >= next, "watcher from {start}: revision {rev} arrived when {next} was next (order, uniqueness, start)");
                // No gap: every expected revision between `next` and `rev` had no events.
                let missed: Vec<i64> = expected.range(next..rev).map(|(k, _)| *k).collect();
                assert!(missed.is_empty(), "watcher from {start} skipped revisions {missed:?} (got {rev})");
                let want = expected.get(&rev).unwrap_or_else(|| panic!("event at {rev} that the store does not have"));
                let mut got_evs: Vec<(i32, KeyValue, Option<KeyValue>)> =
                    evs.iter().map(|e| (e.r#type, e.kv.clone().unwrap(), e.prev_kv.clone())).collect();
                let mut want_evs: Vec<(i32, KeyValue, Option<KeyValue>)> =
                    want.iter().map(|(t, k, p)| (*t, k.clone(), if prev { p.clone() } else { None })).collect();
                got_evs.sort_by(|a, b| a.1.key.cmp(&b.1.key));
                want_evs.sort_by(|a, b| a.1.key.cmp(&b.1.key));
                assert_eq!(got_evs, want_evs, "watcher from {start}: events at revision {rev}");
                next = rev + 1;
            }
        }
        if !cancelled && next <= last {
            let missed: Vec<i64> = expected.range(next..=last).map(|(k, _)| *k).collect();
            assert!(missed.is_empty(), "watcher from {start} never got revisions {missed:?}");
        }
    }
}

/// Regression (found by keel-chaos): a follower that installs a snapshot from the leader resyncs
/// its watchers; that ran on the raft thread outside the async runtime and panicked ("there is no
/// reactor running"), killing the member. Now the watcher catches up from the new store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_with_watchers_survives_installing_a_snapshot() {
    let _g = SERIAL.lock().await;
    let c = Cluster::start(3, &["--snapshot-count", "100"]).await;
    let leader = c.leader(&[0, 1, 2]).await;
    let f = (0..3).find(|i| *i != leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != f).collect();
    // A watcher on the follower, synced before it falls behind.
    let mut wc = WatchClient::new(channel(&c.members[f].client_url()).await);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"snap/".to_vec(),
            range_end: b"snap0".to_vec(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut events = wc.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(events.message().await.unwrap().unwrap().created);
    // Cut the follower off, write well past the leader's retained log, heal.
    let f_ip = c.members[f].ip;
    c.members[f].proxy.as_ref().unwrap().block(None);
    for &i in &others {
        c.members[i].proxy.as_ref().unwrap().block(Some(f_ip));
    }
    // Beyond the 5,000 entries the leader keeps for slow followers after a snapshot.
    let cut_at = raft_index(&c, leader).await;
    let n = 6000;
    load(&c, &others, "snap/", n, 32).await;
    wait_raft_log_past(&c.members[leader].client_url(), cut_at).await;
    for m in &c.members {
        m.proxy.as_ref().unwrap().heal();
    }
    // Every event arrives, in order, and the member is still serving.
    let mut seen = 0usize;
    let mut last_rev = 0i64;
    while seen < n {
        let r = tokio::time::timeout(Duration::from_secs(30), events.message()).await;
        let r = match r {
            Ok(Ok(Some(r))) => r,
            other => panic!(
                "watch on the follower ended after {seen} of {n} events: {other:?}\n{}",
                c.members[f].proc.as_ref().unwrap().log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            ),
        };
        for e in &r.events {
            let rev = e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
            assert!(rev > last_rev, "events out of order: {rev} after {last_rev}");
            last_rev = rev;
            seen += 1;
        }
    }
    // Received (counted before it is installed, so before any event it brought was sent).
    let log = c.members[f].proc.as_ref().unwrap().log_text();
    assert!(
        snapshots_received(&c, f) >= 1.0,
        "the follower did not catch up by snapshot:\n{}",
        log.lines().filter(|l| l.contains("snapshot") || l.contains("peer")).collect::<Vec<_>>().join("\n")
    );
    assert!(!log.contains("panicked"), "the follower panicked:\n{log}");
    let mut kv_f = c.kv(f).await;
    assert_eq!(count_prefix(&mut kv_f, "snap/", false).await.unwrap(), n as i64);
}

/// Whole-range reads on every member (each a response of tens of MB) while a client writes:
/// reads are planned under the store lock and loaded without it, and the raft thread never waits
/// for the store, so no member misses heartbeats (no election) and every write completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_reads_on_every_member_neither_stall_writes_nor_move_the_leader() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(3, &[]).await;
    let leader = c.leader(&[0, 1, 2]).await;
    // About 40 MB of values.
    let (keys, value) = (20_000usize, vec![b'x'; 2000]);
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut kv = c.kv(leader).await;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < keys {
                kv.put(PutRequest { key: format!("big/{i:08}").into(), value: value.clone(), ..Default::default() }).await?;
                i += 32;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("load");
    }
    let status = |i: usize| {
        let url = c.members[i].client_url();
        async move { MaintenanceClient::new(channel(&url).await).status(StatusRequest {}).await.unwrap().into_inner() }
    };
    let before = status(leader).await;

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    // One reader per member: the readers, the three members and this client share the machine's
    // cores (two in CI, one of them taken by a busy loop); nine concurrent 40 MB reads left a
    // member's ReadIndex waiting past the request timeout for CPU alone.
    for m in 0..3 {
        let mut kv = c.kv(m).await.max_decoding_message_size(usize::MAX);
        readers.push(tokio::spawn(async move {
            let mut total = 0usize;
            for _ in 0..2 {
                let r = kv.range(RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() }).await?.into_inner();
                total += r.kvs.len();
            }
            Ok::<usize, tonic::Status>(total)
        }));
    }
    let writer = {
        let mut kv = c.kv(leader).await;
        let done = done.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !done.load(std::sync::atomic::Ordering::Acquire) || n < 50 {
                kv.put(PutRequest { key: format!("w/{n:08}").into(), value: b"v".to_vec(), ..Default::default() }).await?;
                n += 1;
            }
            Ok::<usize, tonic::Status>(n)
        })
    };
    for r in readers {
        let read = r.await.unwrap().expect("whole-range read");
        assert!(read >= 2 * keys, "each read saw every key: {read}");
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let written = writer.await.unwrap().expect("every write during the reads completes");
    let after = status(leader).await;
    assert_eq!(after.leader, before.leader, "the leader did not change during the reads");
    assert_eq!(after.raft_term, before.raft_term, "no election during the reads");
    let mut kv = c.kv((leader + 1) % 3).await;
    assert_eq!(count_prefix(&mut kv, "w/", false).await.unwrap(), written as i64, "every acknowledged write is there");
}

/// Regression: with the backend quota off (`--quota-backend-bytes=-1`, as etcd allows) the bound
/// on a received snapshot was twice a quota of 0, so a follower that fell behind the leader's
/// retained log refused every snapshot and never caught up. The bound no longer depends on the
/// quota being on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_by_snapshot_with_the_quota_off() {
    let _g = SERIAL.lock().await;
    let extra = ["--quota-backend-bytes", "-1", "--snapshot-count", "100", "--experimental-snapshot-catchup-entries", "10"];
    let mut c = Cluster::start(3, &extra).await;
    let leader = c.leader(&[0, 1, 2]).await;
    let f = (0..3).find(|i| *i != leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != f).collect();
    c.members[f].proc.as_mut().unwrap().stop();
    // The stopped follower's log ends at or before the leader's last entry now.
    let stopped_at = raft_index(&c, leader).await;
    let n = 1400;
    load(&c, &others, "q/", n, 8).await;
    wait_raft_log_past(&c.members[leader].client_url(), stopped_at).await;
    c.restart(f, &extra);
    let mut kv_f = c.kv(f).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if count_prefix(&mut kv_f, "q/", true).await.ok() == Some(n as i64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted follower did not catch up in 60 s:\n{}",
            c.members[f].proc.as_ref().unwrap().log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(snapshots_received(&c, f) >= 1.0, "the follower caught up without a snapshot: the test did not test the bound");
    // Between Keel members the backend travels as Keel's records, not as an etcd file.
    let sent = |format| others.iter().map(|i| snapshots_sent_as(&c.members[*i].client_url(), format)).sum::<f64>();
    let (as_keel, as_etcd) = (sent("keel"), sent("etcd"));
    assert!(as_keel >= 1.0 && as_etcd == 0.0, "Keel to Keel: {as_keel} sends of Keel's records, {as_etcd} of etcd's file");
}

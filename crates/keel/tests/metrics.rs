//! Keel's `/metrics` against real etcd 3.6.16's and 3.7.3's: a 3-member cluster of each, `--metrics
//! extensive`, the same load on both (KV, a txn, a lease with a keep-alive, a watch, compaction,
//! HashKV, Hash, Status, defragment, a snapshot, health checks); then every member's families
//! are compared: each family etcd shows must be on Keel with the same type, the same label names
//! and the same histogram buckets, and the gRPC families must name the same services and methods.
//! A family etcd has that Keel lacks would be named in `NOT_ON_KEEL`, with its reason.

mod common;

use common::*;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tonic::transport::Channel;

/// etcd families Keel does not export, each with its reason (none now: the peer round-trip
/// family, once missing for want of a prober, is fed by Keel's).
const NOT_ON_KEEL: &[(&str, &str)] = &[];

/// gRPC methods etcd serves that Keel does not, each with its reason.
const METHODS_NOT_ON_KEEL: &[((&str, &str), &str)] =
    &[(("grpc.health.v1.Health", "List"), "tonic-health serves Check and Watch; List is newer than it")];

#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    /// Upper bounds, as printed (Go prints 1.048576e+06 where Rust prints 1048576): compared as
    /// numbers.
    buckets: BTreeSet<String>,
    /// (grpc_service, grpc_method) pairs seen in the family's series.
    methods: BTreeSet<(String, String)>,
}

/// The families of a Prometheus text exposition, merged into `into`.
fn parse(text: &str, into: &mut BTreeMap<String, Family>) {
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            current = name.to_string();
            into.entry(current.clone()).or_default().kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some(f) = into.get_mut(&current) else { continue };
        let labels = line.split_once('{').and_then(|(_, r)| r.rsplit_once('}')).map(|(l, _)| l).unwrap_or("");
        let mut service = None;
        let mut method = None;
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            let v = v.trim_end_matches('"');
            match k {
                "le" => {
                    f.buckets.insert(v.to_string());
                }
                "quantile" => {}
                "grpc_service" => service = Some(v.to_string()),
                "grpc_method" => method = Some(v.to_string()),
                _ => {}
            }
            if k != "le" && k != "quantile" {
                f.labels.insert(k.to_string());
            }
        }
        if let (Some(s), Some(m)) = (service, method) {
            f.methods.insert((s, m));
        }
    }
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// The same requests against either cluster.
async fn load(urls: &[String]) {
    let ch = channel(&urls[0]).await;
    let mut kv = KvClient::new(ch.clone());
    for i in 0..30 {
        kv.put(PutRequest { key: format!("k{i}").into(), value: b"v".to_vec(), ..Default::default() }).await.unwrap();
    }
    kv.range(RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() }).await.unwrap();
    kv.range(RangeRequest { key: b"k1".to_vec(), serializable: true, ..Default::default() }).await.unwrap();
    let put = RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key: b"t".to_vec(), ..Default::default() })) };
    kv.txn(TxnRequest { success: vec![put], ..Default::default() }).await.unwrap();
    kv.delete_range(DeleteRangeRequest { key: b"k0".to_vec(), ..Default::default() }).await.unwrap();
    // A bad request: an error code in the gRPC families.
    assert!(kv.range(RangeRequest::default()).await.is_err());
    let mut lease = LeaseClient::new(ch.clone());
    let id = lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await.unwrap().into_inner().id;
    kv.put(PutRequest { key: b"leased".to_vec(), lease: id, ..Default::default() }).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(LeaseKeepAliveRequest { id }).await.unwrap();
    let mut ka = lease.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    ka.message().await.unwrap().unwrap();
    drop(tx);
    lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }).await.unwrap();
    // A watch that sees one event.
    let mut watch = WatchClient::new(ch.clone());
    let (wtx, wrx) = tokio::sync::mpsc::channel(4);
    let create = watch_request::RequestUnion::CreateRequest(WatchCreateRequest { key: b"w".to_vec(), ..Default::default() });
    wtx.send(WatchRequest { request_union: Some(create) }).await.unwrap();
    let mut events = watch.watch(tokio_stream::wrappers::ReceiverStream::new(wrx)).await.unwrap().into_inner();
    events.message().await.unwrap().unwrap();
    kv.put(PutRequest { key: b"w".to_vec(), ..Default::default() }).await.unwrap();
    let got = events.message().await.unwrap().unwrap();
    assert_eq!(got.events.len(), 1);
    let mut m = MaintenanceClient::new(ch.clone());
    let rev = m.status(StatusRequest {}).await.unwrap().into_inner().header.unwrap().revision;
    kv.compact(CompactionRequest { revision: rev - 5, physical: true }).await.unwrap();
    m.hash_kv(HashKvRequest { revision: 0 }).await.unwrap();
    m.hash(HashRequest {}).await.unwrap();
    m.defragment(DefragmentRequest {}).await.unwrap();
    let mut snap = m.snapshot(SnapshotRequest {}).await.unwrap().into_inner();
    while snap.message().await.unwrap().is_some() {}
    for u in urls {
        for path in ["/health", "/livez", "/readyz", "/version"] {
            http_get(u, path);
        }
    }
    drop(wtx);
}

/// Starts a 3-member cluster of `bin` on 127.0.0.{first..first+2}.
fn cluster(bin: &Path, dir: &Path, first: u8) -> (Vec<Proc>, Vec<String>) {
    let nodes: Vec<Node> = (0..3).map(|i| Node::new(&format!("m{i}"), &format!("127.0.0.{}", first + i))).collect();
    let initial = nodes.iter().map(|n| format!("{}={}", n.name, n.purl())).collect::<Vec<_>>().join(",");
    let mut procs: Vec<Proc> = nodes
        .iter()
        .map(|n| {
            let d = dir.join(&n.name);
            let mut args = n.args(&d, &initial);
            args.extend(["--metrics".to_string(), "extensive".to_string()]);
            spawn(bin, &d, &n.curl(), &args)
        })
        .collect();
    for p in &mut procs {
        assert!(p.wait_ready(), "{} did not start:\n{}", bin.display(), p.log_text());
    }
    (procs, nodes.iter().map(|n| n.curl()).collect())
}

fn scrape(urls: &[String]) -> BTreeMap<String, Family> {
    let mut all = BTreeMap::new();
    for u in urls {
        parse(&http_get(u, "/metrics"), &mut all);
    }
    all
}

/// Families one etcd line has and the other not: Keel exports both lines' (3.6 dashboards keep
/// working, 3.7's are there), so each is allowed on Keel when the etcd compared lacks it.
const ONE_LINE_ONLY: &[&str] = &[
    // etcd 3.6's v2 store counters, gone in 3.7.
    "etcd_debugging_store_reads_total",
    "etcd_debugging_store_writes_total",
    // etcd 3.7's.
    "etcd_debugging_server_watch_send_loop_control_stream_duration_seconds",
    "etcd_debugging_server_watch_send_loop_progress_duration_seconds",
    "etcd_debugging_server_watch_send_loop_watch_stream_duration_per_event_seconds",
    "etcd_debugging_server_watch_send_loop_watch_stream_duration_seconds",
    "etcd_server_request_duration_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_etcd_3_6_metric_family_is_on_keel_with_the_same_type_labels_and_buckets() {
    compare("3.6").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_etcd_3_7_metric_family_is_on_keel_with_the_same_type_labels_and_buckets() {
    compare("v3.7.3").await
}

async fn compare(version: &'static str) {
    let Some(e) = etcd(version) else { return };
    let tmp = tempfile::tempdir().unwrap();
    for d in ["etcd", "keel"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let (_etcd, etcd_urls) = cluster(&e.server, &tmp.path().join("etcd"), 31);
    let (_keel, keel_urls) = cluster(&keel_bin(), &tmp.path().join("keel"), 34);
    load(&etcd_urls).await;
    load(&keel_urls).await;
    // Both probe their peers every 4 s: the round-trip family has series once each member has
    // probed (awaited, at most 30 s).
    for url in etcd_urls.iter().chain(&keel_urls) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !http_get(url, "/metrics").contains("etcd_network_peer_round_trip_time_seconds_bucket") {
            assert!(std::time::Instant::now() < deadline, "{url} has not probed its peers in 30 s");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let want = scrape(&etcd_urls);
    let got = scrape(&keel_urls);
    assert!(want.len() > 100, "etcd showed only {} families", want.len());
    let mut problems = Vec::new();
    for (name, w) in &want {
        if NOT_ON_KEEL.iter().any(|(n, _)| n == name) {
            continue;
        }
        let Some(g) = got.get(name) else {
            problems.push(format!("{name}: missing ({} {:?})", w.kind, w.labels));
            continue;
        };
        if g.kind != w.kind {
            problems.push(format!("{name}: type {} on Keel, {} on etcd", g.kind, w.kind));
        }
        if g.labels != w.labels {
            problems.push(format!("{name}: labels {:?} on Keel, {:?} on etcd", g.labels, w.labels));
        }
        let bounds = |b: &BTreeSet<String>| -> Vec<f64> {
            let mut v: Vec<f64> = b.iter().map(|x| if x == "+Inf" { f64::INFINITY } else { x.parse().unwrap() }).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        if bounds(&g.buckets) != bounds(&w.buckets) {
            problems.push(format!("{name}: buckets {:?} on Keel, {:?} on etcd", g.buckets, w.buckets));
        }
        let missing: Vec<_> =
            w.methods.difference(&g.methods).filter(|(s, m)| !METHODS_NOT_ON_KEEL.iter().any(|((ns, nm), _)| ns == s && nm == m)).collect();
        if !missing.is_empty() {
            problems.push(format!("{name}: methods missing on Keel: {missing:?}"));
        }
    }
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    eprintln!("families only on Keel: {extra:?}");
    assert!(
        extra.iter().all(|k| k.starts_with("keel_") || k.starts_with("process_") || ONE_LINE_ONLY.contains(&k.as_str())),
        "unexpected families only on Keel: {extra:?}"
    );
    assert!(problems.is_empty(), "{} differences from etcd {version}:\n{}", problems.len(), problems.join("\n"));
}

//! The workloads: put, range, txn-put, txn-mixed, watch, watch-latency, lease-keepalive.
//!
//! Request-driven workloads share one loop ([`drive`]): `clients` tasks take request numbers
//! from a shared counter until `total`, optionally paced to `rate` per second overall, and
//! record each request's latency.

use crate::report::{new_hist, Report};
use crate::Ctx;
use anyhow::Result;
use clap::{Args, Subcommand};
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::*;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Puts keys.
    Put(PutArgs),
    /// Reads KEY (or [KEY, END)).
    Range(RangeArgs),
    /// Transactions with one compare and one put.
    TxnPut(PutArgs),
    /// Transactions that read or write keys of a key space, by --rw-ratio.
    TxnMixed(MixedArgs),
    /// Many watchers (streams × watchers per stream) while keys are put: creation time and
    /// event delivery latency.
    Watch(WatchArgs),
    /// Event delivery latency with a few watchers.
    WatchLatency(WatchArgs),
    /// Lease keep-alives: one stream per client, each renewing its share of --leases in turn.
    LeaseKeepalive(LeaseArgs),
}

#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    #[command(flatten)]
    common: Common,
    /// Leases kept alive (granted first, spread over the clients; at least one per client).
    #[arg(long, default_value_t = 0)]
    leases: usize,
    /// TTL of each lease, in seconds.
    #[arg(long, default_value_t = 60)]
    ttl: i64,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Total number of requests.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Requests per second over all clients (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Prints each request slower than this many milliseconds to stderr, with when it began
    /// (Unix time in seconds) and how long it took, to line it up with the servers' own
    /// records (0: none).
    #[arg(long, default_value_t = 0.0)]
    slow_ms: f64,
}

#[derive(Args, Debug, Clone)]
pub struct PutArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1)]
    key_space_size: u64,
    /// Keys in order rather than at random.
    #[arg(long)]
    sequential_keys: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    key: String,
    end: Option<String>,
    #[command(flatten)]
    common: Common,
    /// l (linearizable) or s (serializable).
    #[arg(long, default_value = "l")]
    consistency: String,
    #[arg(long, default_value_t = 0)]
    limit: i64,
    #[arg(long)]
    count_only: bool,
    /// Read every key (KEY and END are ignored: the range ["\0", "\0")).
    #[arg(long)]
    all_keys: bool,
    /// Each request reads one key picked at random among this many, named as `put` names them
    /// (KEY and END are ignored; 0: read KEY).
    #[arg(long, default_value_t = 0)]
    key_space_size: u64,
    /// Size of those keys (as `put --key-size`).
    #[arg(long, default_value_t = 8)]
    key_size: usize,
}

#[derive(Args, Debug, Clone)]
pub struct MixedArgs {
    #[command(flatten)]
    put: PutArgs,
    /// Reads per write.
    #[arg(long, default_value_t = 1.0)]
    rw_ratio: f64,
    #[arg(long, default_value = "l")]
    consistency: String,
}

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch streams (spread over the connections).
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Watchers per stream.
    #[arg(long, default_value_t = 10)]
    watchers_per_stream: usize,
    /// Puts to make while watching.
    #[arg(long, default_value_t = 1000)]
    put_total: u64,
    /// Puts per second.
    #[arg(long, default_value_t = 100.0)]
    put_rate: f64,
    /// Distinct keys watched and put (watchers are spread over them).
    #[arg(long, default_value_t = 1)]
    watched_key_total: u64,
    #[arg(long, default_value_t = 32)]
    key_size: usize,
    #[arg(long, default_value_t = 32)]
    val_size: usize,
}

/// Key number `n` as `size` bytes: a fixed prefix and the number in decimal, zero-padded.
fn key_bytes(n: u64, size: usize) -> Vec<u8> {
    let s = format!("{n:0width$}", width = size.max(1));
    let b = s.into_bytes();
    if b.len() > size.max(1) {
        b[b.len() - size.max(1)..].to_vec()
    } else {
        b
    }
}

fn pick_key(a: &PutArgs, n: u64) -> Vec<u8> {
    let space = a.key_space_size.max(1);
    let k = if a.sequential_keys { n % space } else { rand::random::<u64>() % space };
    key_bytes(k, a.key_size)
}

/// Runs `f(client, n)` for n in 0..total over `ctx.clients` tasks.
async fn drive<F, Fut>(ctx: &Ctx, name: &str, c: &Common, f: F) -> Report
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let total = c.total;
    let rate = c.rate;
    let slow = Duration::from_secs_f64(c.slow_ms.max(0.0) / 1e3);
    let bar = if ctx.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..ctx.clients {
        let (next, errors, first_error, f, bar) = (next.clone(), errors.clone(), first_error.clone(), f.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = new_hist();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                if rate > 0.0 {
                    tokio::time::sleep_until((start + Duration::from_secs_f64(n as f64 / rate)).into()).await;
                }
                // The wall clock only when slow requests are listed.
                let began = (!slow.is_zero()).then(std::time::SystemTime::now);
                let t = Instant::now();
                match f(client, n).await {
                    Ok(()) => {
                        let took = t.elapsed();
                        let _ = h.record((took.as_micros() as u64).max(1));
                        if let Some(began) = began.filter(|_| took >= slow) {
                            let at = began.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                            eprintln!("slow request: began {:.3} took {:.2} ms", at.as_secs_f64(), took.as_secs_f64() * 1e3);
                        }
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut fe = first_error.lock();
                        fe.get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                    }
                }
                bar.inc(1);
            }
            h
        }));
    }
    let mut hist = new_hist();
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = hist.add(h);
        }
    }
    bar.finish_and_clear();
    let first_error = first_error.lock().clone();
    Report { name: name.to_string(), hist, errors: errors.load(Ordering::Relaxed), elapsed: start.elapsed(), first_error }
}

fn clients<T, F: Fn(tonic::transport::Channel) -> T>(ctx: &Ctx, mk: F) -> Arc<Vec<tokio::sync::Mutex<T>>> {
    Arc::new((0..ctx.clients).map(|i| tokio::sync::Mutex::new(mk(ctx.chan(i)))).collect())
}

fn token_req<T>(token: &Option<String>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = t.parse() {
            r.metadata_mut().insert("token", v);
        }
    }
    r
}

pub async fn run(ctx: &Ctx, cmd: &Cmd) -> Result<Report> {
    let token = ctx.token.clone();
    Ok(match cmd {
        Cmd::Put(a) => {
            let kvs = clients(ctx, KvClient::new);
            let (a2, value) = (a.clone(), vec![b'v'; a.val_size]);
            drive(ctx, "put", &a.common, move |c, n| {
                let (kvs, a, value, token) = (kvs.clone(), a2.clone(), value.clone(), token.clone());
                async move {
                    let req = PutRequest { key: pick_key(&a, n), value, ..Default::default() };
                    kvs[c].lock().await.put(token_req(&token, req)).await.map(|_| ())
                }
            })
            .await
        }
        Cmd::TxnPut(a) => {
            let kvs = clients(ctx, KvClient::new);
            let (a2, value) = (a.clone(), vec![b'v'; a.val_size]);
            drive(ctx, "txn-put", &a.common, move |c, n| {
                let (kvs, a, value, token) = (kvs.clone(), a2.clone(), value.clone(), token.clone());
                async move {
                    let key = pick_key(&a, n);
                    let cmp = Compare {
                        result: CompareResult::Greater as i32,
                        target: CompareTarget::Version as i32,
                        key: key.clone(),
                        target_union: Some(TargetUnion::Version(-1)),
                        ..Default::default()
                    };
                    let put = RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })) };
                    let req = TxnRequest { compare: vec![cmp], success: vec![put], failure: vec![] };
                    kvs[c].lock().await.txn(token_req(&token, req)).await.map(|_| ())
                }
            })
            .await
        }
        Cmd::Range(a) => {
            // Whole-range reads can be hundreds of MB.
            let kvs = clients(ctx, |ch| KvClient::new(ch).max_decoding_message_size(usize::MAX));
            let (key, range_end) =
                if a.all_keys { (vec![0], vec![0]) } else { (a.key.clone().into_bytes(), a.end.clone().unwrap_or_default().into_bytes()) };
            let req = RangeRequest {
                key,
                range_end,
                limit: a.limit,
                count_only: a.count_only,
                serializable: a.consistency == "s",
                ..Default::default()
            };
            let name = if req.serializable { "range (serializable)" } else { "range (linearizable)" };
            let (space, key_size) = (a.key_space_size, a.key_size);
            drive(ctx, name, &a.common, move |c, _| {
                let (kvs, mut req, token) = (kvs.clone(), req.clone(), token.clone());
                if space > 0 {
                    req.key = key_bytes(rand::random::<u64>() % space, key_size);
                    req.range_end = Vec::new();
                }
                async move { kvs[c].lock().await.range(token_req(&token, req)).await.map(|_| ()) }
            })
            .await
        }
        Cmd::TxnMixed(m) => {
            let kvs = clients(ctx, KvClient::new);
            let (m2, value) = (m.clone(), vec![b'v'; m.put.val_size]);
            let reads_per_write = m.rw_ratio.max(0.0);
            drive(ctx, "txn-mixed", &m.put.common, move |c, n| {
                let (kvs, m, value, token) = (kvs.clone(), m2.clone(), value.clone(), token.clone());
                async move {
                    let key = pick_key(&m.put, n);
                    let read = rand::random::<f64>() < reads_per_write / (reads_per_write + 1.0);
                    let op = if read {
                        request_op::Request::RequestRange(RangeRequest { key, serializable: m.consistency == "s", ..Default::default() })
                    } else {
                        request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })
                    };
                    let req = TxnRequest { compare: vec![], success: vec![RequestOp { request: Some(op) }], failure: vec![] };
                    kvs[c].lock().await.txn(token_req(&token, req)).await.map(|_| ())
                }
            })
            .await
        }
        Cmd::LeaseKeepalive(a) => {
            // One keep-alive stream per client, renewing its leases in turn.
            let leases = a.leases.max(ctx.clients);
            let mut ids: Vec<Vec<i64>> = vec![Vec::new(); ctx.clients];
            for i in 0..leases {
                let mut lc = LeaseClient::new(ctx.chan(i));
                let id = lc.lease_grant(ctx.req(LeaseGrantRequest { ttl: a.ttl, id: 0 })).await?.into_inner().id;
                ids[i % ctx.clients].push(id);
            }
            let mut streams = Vec::new();
            for (c, mine) in ids.into_iter().enumerate() {
                let mut lc = LeaseClient::new(ctx.chan(c));
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                // etcd (gRPC-Go) sends the response headers with its first answer: the first
                // keep-alive goes out before the call waits for them.
                tx.send(LeaseKeepAliveRequest { id: mine[0] }).await.map_err(|_| anyhow::anyhow!("keep-alive stream closed"))?;
                let mut out = lc.lease_keep_alive(ctx.req(tokio_stream::wrappers::ReceiverStream::new(rx))).await?.into_inner();
                out.message().await?;
                streams.push(tokio::sync::Mutex::new((tx, out, mine, 1usize)));
            }
            let streams = Arc::new(streams);
            drive(ctx, "lease-keepalive", &a.common, move |c, _| {
                let streams = streams.clone();
                async move {
                    let mut s = streams[c].lock().await;
                    let id = s.2[s.3 % s.2.len()];
                    s.3 += 1;
                    s.0.send(LeaseKeepAliveRequest { id }).await.map_err(|_| tonic::Status::cancelled("stream closed"))?;
                    match s.1.message().await? {
                        Some(_) => Ok(()),
                        None => Err(tonic::Status::cancelled("stream ended")),
                    }
                }
            })
            .await
        }
        Cmd::Watch(w) => watch(ctx, w, "watch").await?,
        Cmd::WatchLatency(w) => watch(ctx, w, "watch-latency").await?,
    })
}

/// Creates the watchers, then puts `put_total` values carrying their send time; the report is
/// the delivery latency of every event to every watcher.
async fn watch(ctx: &Ctx, w: &WatchArgs, name: &str) -> Result<Report> {
    let keys: Vec<Vec<u8>> =
        (0..w.watched_key_total.max(1)).map(|k| [b"w".as_slice(), &key_bytes(k, w.key_size.max(2) - 1)].concat()).collect();
    let t0 = Instant::now();
    let total_watchers = w.streams * w.watchers_per_stream;
    let expected = Arc::new(AtomicU64::new(0));
    let (hist_tx, mut hist_rx) = tokio::sync::mpsc::channel::<hdrhistogram::Histogram<u64>>(w.streams.max(1));
    let created = Arc::new(tokio::sync::Barrier::new(w.streams + 1));
    let (stop, _) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let mut per_key = vec![0u64; keys.len()];
    for s in 0..w.streams {
        let (tx, rx) = tokio::sync::mpsc::channel::<WatchRequest>(w.watchers_per_stream + 1);
        let mut wc = WatchClient::new(ctx.chan(s));
        let mut my_keys = Vec::new();
        for i in 0..w.watchers_per_stream {
            let k = (s * w.watchers_per_stream + i) % keys.len();
            per_key[k] += 1;
            my_keys.push(keys[k].clone());
        }
        for k in &my_keys {
            let create = watch_request::RequestUnion::CreateRequest(WatchCreateRequest { key: k.clone(), ..Default::default() });
            tx.send(WatchRequest { request_union: Some(create) }).await?;
        }
        let mut stream = wc.watch(ctx.req(tokio_stream::wrappers::ReceiverStream::new(rx))).await?.into_inner();
        // Events this stream will see: each watcher sees every put of its key.
        let kcount = keys.len() as u64;
        let puts_of = |k: u64| w.put_total / kcount + u64::from(k < w.put_total % kcount);
        let want: u64 = (0..w.watchers_per_stream).map(|i| puts_of(((s * w.watchers_per_stream + i) % keys.len()) as u64)).sum();
        let (created, hist_tx, n, stop) = (created.clone(), hist_tx.clone(), my_keys.len(), stop.clone());
        tokio::spawn(async move {
            let _keep = tx;
            let mut made = 0;
            let mut h = new_hist();
            let mut stopped = stop.subscribe();
            while h.len() < want || made < n {
                let resp = tokio::select! {
                    m = stream.message() => match m { Ok(Some(r)) => r, _ => break },
                    _ = stopped.changed() => break,
                };
                if resp.created {
                    made += 1;
                    if made == n {
                        created.wait().await;
                    }
                    continue;
                }
                if resp.canceled {
                    break;
                }
                let now = t0.elapsed().as_micros() as u64;
                for ev in resp.events {
                    if let Some(kv) = ev.kv {
                        let sent = kv.value.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(now);
                        let _ = h.record(now.saturating_sub(sent).max(1));
                    }
                }
            }
            let _ = hist_tx.send(h).await;
        });
    }
    drop(hist_tx);
    if tokio::time::timeout(Duration::from_secs(120), created.wait()).await.is_err() {
        anyhow::bail!("watchers were not all created within 120 s");
    }
    let setup = t0.elapsed();
    if !ctx.json {
        println!("created {total_watchers} watchers on {} streams in {setup:?}", w.streams);
    }
    // Puts, paced; the value carries the send time.
    let mut kv = KvClient::new(ctx.chan(0));
    let start = Instant::now();
    let mut errors = 0;
    for n in 0..w.put_total {
        if w.put_rate > 0.0 {
            tokio::time::sleep_until((start + Duration::from_secs_f64(n as f64 / w.put_rate)).into()).await;
        }
        let k = (n % keys.len() as u64) as usize;
        expected.fetch_add(per_key[k], Ordering::Relaxed);
        let mut value = (t0.elapsed().as_micros() as u64).to_be_bytes().to_vec();
        value.resize(w.val_size.max(8), b'v');
        if kv.put(ctx.req(PutRequest { key: keys[k].clone(), value, ..Default::default() })).await.is_err() {
            errors += 1;
        }
    }
    // Let the last events arrive, then stop the streams by dropping the client side.
    let want = expected.load(Ordering::Relaxed);
    let mut deadline = Instant::now() + Duration::from_secs(10);
    let mut hist = new_hist();
    let mut done = 0;
    while done < w.streams {
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), hist_rx.recv()).await {
            Ok(Some(h)) => {
                let _ = hist.add(h);
                done += 1;
            }
            Ok(None) => break,
            Err(_) if !*stop.borrow() => {
                // Late streams stop and report what they have.
                let _ = stop.send(true);
                deadline = Instant::now() + Duration::from_secs(5);
            }
            Err(_) => break,
        }
    }
    let missing = want.saturating_sub(hist.len());
    Ok(Report {
        name: format!("{name} ({total_watchers} watchers, {} puts at {}/s; setup {setup:?})", w.put_total, w.put_rate),
        hist,
        errors: errors + missing,
        elapsed: start.elapsed(),
        first_error: (missing > 0).then(|| format!("{missing} events not delivered within 10 s")),
    })
}

//! etcd's v3 discovery (`--discovery-token`, `--discovery-endpoints`): a member of a new cluster
//! learns its initial cluster from another etcd (or Keel) cluster instead of
//! `--initial-cluster`.
//!
//! The discovery cluster holds the wanted size at `/_etcd/registry/<token>/_config/size`. Each
//! new member registers `name=peer-urls` at `/_etcd/registry/<token>/members/<member ID>`, then
//! waits (a watch) until `size` members have registered; the first `size` by creation revision
//! are the initial cluster, the same on every member. A member that is not among them is refused
//! ("discovery: cluster is full"). Only the bootstrap of a member without a WAL asks; a member
//! that has data ignores the flags, as etcd does.
//!
//! Owns nothing after start; calls the discovery cluster as an etcd client (KV and Watch, Auth
//! for `--discovery-user`) over the peer dialer's channels.

use anyhow::{anyhow, bail, Context, Result};
use keel_config::{parse_go_duration, split_urls, Config};
use keel_proto::etcdserverpb::auth_client::AuthClient;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::{watch_request, AuthenticateRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use std::time::Duration;
use tonic::transport::Channel;

const PREFIX: &str = "/_etcd/registry";
/// Attempts at a step before giving up, with 1, 2, 4 ... seconds between them (etcd's).
const RETRIES: u32 = 3;

/// Whether this member bootstraps by v3 discovery; both flags or neither (etcd's check).
pub fn wanted(cfg: &Config) -> Result<bool> {
    match (cfg.discovery_token.is_empty(), cfg.discovery_endpoints.is_empty()) {
        (true, true) => Ok(false),
        (false, false) => {
            if split_urls(&cfg.discovery_endpoints).len() != cfg.discovery_endpoints.split(',').count() {
                bail!("--discovery-endpoints must not contain empty endpoints");
            }
            Ok(true)
        }
        _ => bail!("both --discovery-token and --discovery-endpoints must be set"),
    }
}

/// One registered member: its registry key, `name=url,...` and creation revision.
struct Registered {
    key: String,
    value: String,
    create_rev: i64,
}

#[derive(Clone)]
struct Session {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
}

impl Session {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("token", t.clone());
        }
        r
    }

    async fn size(&mut self, token: &str) -> Result<usize> {
        let key = format!("{PREFIX}/{token}/_config/size");
        let resp = self.kv.range(self.request(RangeRequest { key: key.into_bytes(), ..Default::default() })).await?.into_inner();
        let kv = resp.kvs.first().ok_or_else(|| anyhow!("discovery: size key not found"))?;
        match std::str::from_utf8(&kv.value).ok().and_then(|v| v.trim().parse::<i64>().ok()) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => bail!("discovery: size key is bad"),
        }
    }

    /// The registered members in creation order, and the revision they were read at.
    async fn members(&mut self, token: &str) -> Result<(Vec<Registered>, i64)> {
        let prefix = format!("{PREFIX}/{token}/members");
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let r = RangeRequest { key: prefix.into_bytes(), range_end: end, ..Default::default() };
        let resp = self.kv.range(self.request(r)).await?.into_inner();
        let mut out = Vec::new();
        for kv in resp.kvs {
            add(&mut out, token, &kv.key, &kv.value, kv.create_revision);
        }
        Ok((out, resp.header.map(|h| h.revision).unwrap_or(0)))
    }
}

/// Adds a registration, in creation order, unless it is malformed or already known.
fn add(out: &mut Vec<Registered>, token: &str, key: &[u8], value: &[u8], create_rev: i64) {
    let key = String::from_utf8_lossy(key).trim().to_string();
    let value = String::from_utf8_lossy(value).trim().to_string();
    if !key.starts_with(&format!("{PREFIX}/{token}/members")) {
        tracing::warn!(member_key = %key, "discovery: invalid peer registry key");
        return;
    }
    if !value.contains('=') {
        tracing::warn!(member_key = %key, member_info = %value, "discovery: invalid peer info returned from discovery service");
        return;
    }
    if out.iter().any(|m| m.key == key) {
        return;
    }
    tracing::info!(member_key = %key, member_info = %value, "found peer from discovery service");
    out.push(Registered { key, value, create_rev });
    out.sort_by_key(|m| m.create_rev);
}

/// Runs `step` up to [`RETRIES`] more times on failure, backing off 1, 2, 4 s.
async fn retry<T, F, Fut>(what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < RETRIES && !is_final(&e) => {
                attempt += 1;
                let backoff = Duration::from_secs(1 << attempt.min(4));
                tracing::warn!(reason = what, error = %format!("{e:#}"), backoff = ?backoff, "retry connecting to discovery service");
                tokio::time::sleep(backoff).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Errors that no retry can fix.
fn is_final(e: &anyhow::Error) -> bool {
    let s = e.to_string();
    s.contains("size key") || s.contains("cluster is full")
}

async fn connect(cfg: &Config, dialer: &crate::peer::Dialer) -> Result<Session> {
    let dial = parse_go_duration(&cfg.discovery_dial_timeout).unwrap_or(Duration::from_secs(2));
    let timeout = parse_go_duration(&cfg.discovery_request_timeout).unwrap_or(Duration::from_secs(5));
    let mut last = None;
    for ep in split_urls(&cfg.discovery_endpoints) {
        let url = if ep.contains("://") { ep.clone() } else { format!("http://{ep}") };
        match tokio::time::timeout(dial, dialer.connect(&url)).await {
            Ok(Ok(ch)) => {
                let mut s = Session { kv: KvClient::new(ch.clone()), watch: WatchClient::new(ch.clone()), token: None, timeout };
                if !cfg.discovery_user.is_empty() {
                    let (name, password) = match cfg.discovery_user.split_once(':') {
                        Some((n, p)) => (n.to_string(), p.to_string()),
                        None => (cfg.discovery_user.clone(), cfg.discovery_password.clone()),
                    };
                    let resp = AuthClient::new(ch).authenticate(s.request(AuthenticateRequest { name, password })).await?.into_inner();
                    s.token = Some(resp.token.parse().context("discovery: auth token")?);
                }
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(anyhow!("{url}: {e:#}")),
            Err(_) => last = Some(anyhow!("{url}: dial timed out")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no discovery endpoint")))
}

/// Registers this member (ID `self_id`, `name=peer-urls` in `self_value`) and returns the initial
/// cluster (`name=url,...`) once the discovery cluster has `size` members.
pub async fn join(cfg: &Config, dialer: &crate::peer::Dialer, self_id: u64, self_value: &str) -> Result<String> {
    tracing::info!("bootstrapping cluster using v3 discovery");
    let token = cfg.discovery_token.clone();
    let mut s = retry("connect", || connect(cfg, dialer)).await?;
    let me = format!("{PREFIX}/{token}/members/{self_id:x}");
    // The cluster may already be complete without this member.
    check(&mut s, &token, &me).await?;
    let put = PutRequest { key: me.clone().into_bytes(), value: self_value.as_bytes().to_vec(), ..Default::default() };
    retry("register member itself", || {
        let (mut kv, req) = (s.kv.clone(), s.request(put.clone()));
        async move { kv.put(req).await.map(|_| ()).map_err(anyhow::Error::from) }
    })
    .await?;
    tracing::info!(member_key = %me, member_info = %self_value, "register member itself successfully");
    let (mut members, size, rev) = check(&mut s, &token, &me).await?;
    if members.len() < size {
        tracing::info!(cluster_size = size, found_peers = members.len(), "waiting for peers from discovery service");
        wait(&mut s, &token, &mut members, size, rev).await?;
        tracing::info!(cluster_size = size, found_peers = members.len(), "found all needed peers from discovery service");
    }
    Ok(members.iter().take(size).map(|m| m.value.as_str()).collect::<Vec<_>>().join(","))
}

/// The size, the registered members and their revision; refuses when `size` others came first.
async fn check(s: &mut Session, token: &str, me: &str) -> Result<(Vec<Registered>, usize, i64)> {
    let size = retry("cluster status check", || {
        let (mut s, token) = (s.clone(), token.to_string());
        async move { s.size(&token).await }
    })
    .await?;
    let (members, rev) = s.members(token).await?;
    if let Some(pos) = members.iter().position(|m| m.key == me) {
        if pos >= size {
            bail!("discovery: cluster is full");
        }
    } else if members.len() >= size {
        bail!("discovery: cluster is full");
    }
    Ok((members, size, rev))
}

/// Watches the registry from `rev + 1` until `size` members are in.
async fn wait(s: &mut Session, token: &str, members: &mut Vec<Registered>, size: usize, rev: i64) -> Result<()> {
    let prefix = format!("{PREFIX}/{token}/members");
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let create = WatchCreateRequest { key: prefix.into_bytes(), range_end: end, start_revision: rev + 1, ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = &s.token {
        req.metadata_mut().insert("token", t.clone());
    }
    let mut events = s.watch.watch(req).await?.into_inner();
    while members.len() < size {
        let Some(resp) = events.message().await? else { bail!("discovery: the watch on the registry ended") };
        if resp.canceled {
            bail!("discovery: the watch on the registry was canceled: {}", resp.cancel_reason);
        }
        for ev in resp.events {
            if let Some(kv) = ev.kv {
                add(members, token, &kv.key, &kv.value, kv.create_revision);
            }
        }
    }
    drop(tx);
    Ok(())
}

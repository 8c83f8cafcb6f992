//! An etcd backend (bbolt in etcd's schema) to a Keel backend, and a Keel backend to an etcd
//! one. The `key` bucket and Keel's key table hold the same records (17-byte revision keys, an
//! 18th byte `t` on tombstones, `mvccpb.KeyValue` values); the rest maps bucket by bucket:
//!
//! | etcd bucket | Keel record |
//! |---|---|
//! | `meta`: `consistent_index`, `term`, `finishedCompactRev`, `scheduledCompactRev` | backend meta |
//! | `lease`: 8-byte ID → `leasepb.Lease` | `lease/<id>` → granted TTL |
//! | `auth`: `authEnabled`, `authRevision` | `auth/enabled`, `auth/revision` |
//! | `authUsers`, `authRoles`: name → `authpb.User`/`Role` | `auth/users/<name>`, `auth/roles/<name>` |
//! | `alarm`: `AlarmMember` → empty | `alarm/<member>/<type>` |
//! | `members`, `members_removed` (etcd 3.5+) | `members` (the caller decides) |
//! | `cluster`: `clusterVersion` | `cluster_version` |

use anyhow::{bail, Context, Result};
use keel_mvcc::backend::{Backend, Meta, TABLE_AUX, TABLE_KEYS};
use keel_mvcc::Revision;
use keel_proto::etcdserverpb::AlarmMember;
use keel_proto::keelpb::MemberRecord;
use keel_server::membership::Members;
use prost::Message;
use std::collections::BTreeMap;
use std::path::Path;

/// etcd's `leasepb.Lease`.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRecord {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

pub use keel_server::membership::MemberJson;

/// What an import found besides the records it loaded.
#[derive(Debug, Default)]
pub struct Imported {
    pub meta: Meta,
    /// The `members` bucket (etcd 3.5 and later; empty for 3.4).
    pub members: Vec<MemberRecord>,
    /// The `members_removed` bucket.
    pub removed: Vec<u64>,
    /// Key records (revisions and tombstones) loaded.
    pub revisions: usize,
}

/// Records, and bytes, per backend transaction while importing: what is held in memory at once
/// (10,000 values of 16 KiB would be 160 MB), and what another file's fsync may wait for (each
/// is synced, [`Backend::load`]).
const BATCH: usize = 10_000;
const BATCH_BYTES: usize = 4 << 20;

fn be_u64(v: &[u8], what: &str) -> Result<u64> {
    let b: [u8; 8] = v.get(..8).and_then(|b| b.try_into().ok()).with_context(|| format!("{what}: {} bytes, want 8", v.len()))?;
    Ok(u64::from_be_bytes(b))
}

/// Loads the etcd backend `src` into a new Keel backend at `dest` (which must not exist). The
/// backend is durable when this returns; a failure leaves `dest` removed.
pub fn import(src: &keel_bbolt::Db, dest: &Path) -> Result<Imported> {
    if dest.exists() {
        bail!("{} exists", dest.display());
    }
    let r = import_into(src, dest);
    if r.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    r
}

fn import_into(src: &keel_bbolt::Db, dest: &Path) -> Result<Imported> {
    let out = Backend::open(dest)?;
    let mut imported = Imported::default();
    let mut batch: Vec<(u32, Vec<u8>, Vec<u8>)> = Vec::with_capacity(BATCH);
    let mut max_rev = 0i64;
    let mut bytes = 0usize;
    let mut failed: Option<anyhow::Error> = None;
    let found = src.for_each(b"key", &mut |k, v| {
        let bad = |msg: String| keel_bbolt::Error { file: "key bucket".into(), offset: 0, msg };
        let (rev, _) = Revision::from_key(k).ok_or_else(|| bad(format!("key {k:02x?} is not a revision")))?;
        keel_proto::mvccpb::KeyValue::decode(v).map_err(|e| bad(format!("revision {}: undecodable value: {e}", rev.main)))?;
        max_rev = max_rev.max(rev.main);
        batch.push((TABLE_KEYS, k.to_vec(), v.to_vec()));
        imported.revisions += 1;
        bytes += k.len() + v.len();
        if batch.len() >= BATCH || bytes >= BATCH_BYTES {
            bytes = 0;
            if let Err(e) = out.load(&batch, None) {
                failed = Some(e.into());
                return Err(bad("backend write failed".into()));
            }
            batch.clear();
        }
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    if !found? {
        bail!("not an etcd backend: no `key` bucket");
    }

    let meta = src.bucket_map(b"meta")?;
    let get = |k: &str| meta.get(k.as_bytes()).map(|v| be_u64(v, k)).transpose();
    let finished = get("finishedCompactRev")?.unwrap_or(0) as i64;
    let scheduled = get("scheduledCompactRev")?.unwrap_or(0) as i64;
    imported.meta = Meta {
        consistent_index: get("consistent_index")?.unwrap_or(0),
        term: get("term")?.unwrap_or(0),
        // etcd's rule on start: the current revision is the newest record's, or the compaction
        // point when that is newer.
        current_rev: max_rev.max(finished),
        compacted_rev: finished,
    };

    for (k, v) in src.bucket_map(b"lease")? {
        let id = be_u64(&k, "lease ID")? as i64;
        let l = LeaseRecord::decode(v.as_slice()).with_context(|| format!("lease {id:x}: undecodable"))?;
        batch.push((TABLE_AUX, keel_lease::aux_key(id).into_bytes(), l.ttl.to_be_bytes().to_vec()));
    }
    let auth = src.bucket_map(b"auth")?;
    if let Some(v) = auth.get(b"authEnabled".as_slice()) {
        batch.push((TABLE_AUX, keel_auth::store::AUX_ENABLED.into(), vec![u8::from(v.first() == Some(&1))]));
    }
    if let Some(v) = auth.get(b"authRevision".as_slice()) {
        batch.push((TABLE_AUX, keel_auth::store::AUX_REVISION.into(), be_u64(v, "authRevision")?.to_be_bytes().to_vec()));
    }
    for (bucket, prefix) in [(&b"authUsers"[..], keel_auth::store::AUX_USER), (b"authRoles", keel_auth::store::AUX_ROLE)] {
        for (k, v) in src.bucket_map(bucket)? {
            let name = String::from_utf8(k).map_err(|_| anyhow::anyhow!("a name in {} is not UTF-8", String::from_utf8_lossy(bucket)))?;
            batch.push((TABLE_AUX, format!("{prefix}{name}").into_bytes(), v));
        }
    }
    for (k, _) in src.bucket_map(b"alarm")? {
        let a = AlarmMember::decode(k.as_slice()).context("undecodable alarm")?;
        batch.push((TABLE_AUX, keel_server::alarm::aux_key(a.member_id, a.alarm).into_bytes(), vec![1]));
    }
    let mut cluster = src.bucket_map(b"cluster")?;
    if let Some(v) = cluster.remove(b"clusterVersion".as_slice()) {
        batch.push((TABLE_AUX, keel_server::membership::AUX_CLUSTER_VERSION.into(), v));
    }
    if let Some(v) = cluster.remove(b"downgrade".as_slice()) {
        batch.push((TABLE_AUX, keel_server::membership::AUX_DOWNGRADE.into(), v));
    }
    for (k, v) in src.bucket_map(b"members")? {
        let m: MemberJson = serde_json::from_slice(&v).with_context(|| format!("member {}: undecodable", String::from_utf8_lossy(&k)))?;
        imported.members.push(m.into());
    }
    imported.members.sort_by_key(|m| m.id);
    for (k, _) in src.bucket_map(b"members_removed")? {
        let id = std::str::from_utf8(&k).ok().and_then(|s| u64::from_str_radix(s, 16).ok());
        imported.removed.extend(id);
    }
    out.load(&batch, Some(&imported.meta))?;
    drop(out);
    if scheduled > finished {
        // A compaction etcd scheduled but did not finish: finish it, as etcd does on start.
        let mut store = keel_mvcc::Store::open(dest)?;
        store.compact(scheduled).map_err(|e| anyhow::anyhow!("finish the compaction at {scheduled}: {e}"))?;
        store.commit()?;
    }
    Ok(imported)
}

/// The member list in etcd's `members` bucket form: hex ID → JSON.
fn members_json(m: &Members) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for r in &m.members {
        let j = MemberJson::from(r);
        out.insert(format!("{:x}", r.id).into_bytes(), serde_json::to_vec(&j)?);
    }
    Ok(out)
}

/// Writes the committed state of `src` (one consistent read) as an etcd backend to `out`, marked
/// with its applied cluster version (`cluster` bucket; Keel's own when it has none) and the
/// storage version that follows it (`meta` bucket, as etcd 3.6+ marks its schema: an etcd
/// older than the cluster version refuses the file, as it refuses etcd's own).
pub fn export(src: &Backend, out: std::fs::File) -> Result<std::fs::File> {
    let out = export_staged(src, out)?;
    out.sync_all()?;
    Ok(out)
}

/// [`export`] without the final fsync: for a copy that only stages bytes to send (a raft
/// snapshot, the Snapshot RPC's stream) and is deleted afterwards, where a crash loses nothing
/// and syncing gigabytes would only hold up the WAL's fsyncs on the same disk.
pub fn export_staged(src: &Backend, out: std::fs::File) -> Result<std::fs::File> {
    let mut w = keel_bbolt::Writer::new(std::io::BufWriter::with_capacity(1 << 20, out))?;
    w.bucket(b"key")?;
    let mut aux: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut failed: Option<std::io::Error> = None;
    let meta = src.dump(|table, k, v| match table {
        TABLE_KEYS => match w.put(k, v) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        },
        _ => {
            aux.insert(String::from_utf8_lossy(k).into_owned(), v.to_vec());
            true
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    let meta = meta?;
    fn prefixed<'a>(aux: &'a BTreeMap<String, Vec<u8>>, p: &'static str) -> impl Iterator<Item = (&'a str, &'a Vec<u8>)> + 'a {
        aux.range(p.to_string()..).take_while(move |(k, _)| k.starts_with(p)).map(move |(k, v)| (&k[p.len()..], v))
    }

    let bucket = |w: &mut keel_bbolt::Writer<_>, name: &[u8], kvs: BTreeMap<Vec<u8>, Vec<u8>>| -> Result<()> {
        w.bucket(name)?;
        for (k, v) in kvs {
            w.put(&k, &v)?;
        }
        Ok(())
    };
    let mut alarms = BTreeMap::new();
    for (rest, _) in prefixed(&aux, keel_server::alarm::AUX_PREFIX) {
        if let Some((m, a)) = rest.split_once('/') {
            if let (Ok(member_id), Ok(alarm)) = (u64::from_str_radix(m, 16), a.parse::<i32>()) {
                alarms.insert(AlarmMember { member_id, alarm }.encode_to_vec(), Vec::new());
            }
        }
    }
    bucket(&mut w, b"alarm", alarms)?;
    let mut auth = BTreeMap::new();
    let enabled = aux.get(keel_auth::store::AUX_ENABLED).is_some_and(|v| v.as_slice() == [1]);
    auth.insert(b"authEnabled".to_vec(), vec![u8::from(enabled)]);
    let rev = aux.get(keel_auth::store::AUX_REVISION).and_then(|v| be_u64(v, "auth revision").ok()).unwrap_or(0);
    auth.insert(b"authRevision".to_vec(), rev.to_be_bytes().to_vec());
    bucket(&mut w, b"auth", auth)?;
    let users = prefixed(&aux, keel_auth::store::AUX_USER).map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect();
    bucket(&mut w, b"authUsers", users)?;
    let roles = prefixed(&aux, keel_auth::store::AUX_ROLE).map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect();
    bucket(&mut w, b"authRoles", roles)?;
    let cluster_version = aux
        .get(keel_server::membership::AUX_CLUSTER_VERSION)
        .cloned()
        .unwrap_or_else(|| keel_config::ETCD_CLUSTER_VERSION.as_bytes().to_vec());
    let storage_version =
        keel_server::membership::storage_version(keel_server::membership::parse_cluster_version(Some(&cluster_version)).as_ref())
            .unwrap_or_else(|| keel_config::ETCD_STORAGE_VERSION.to_string());
    let mut cluster = BTreeMap::from([(b"clusterVersion".to_vec(), cluster_version)]);
    if let Some(d) = aux.get(keel_server::membership::AUX_DOWNGRADE) {
        cluster.insert(b"downgrade".to_vec(), d.clone());
    }
    bucket(&mut w, b"cluster", cluster)?;
    let mut leases = BTreeMap::new();
    for (hex, v) in prefixed(&aux, keel_lease::AUX_PREFIX) {
        let Ok(id) = u64::from_str_radix(hex, 16) else { continue };
        let ttl = be_u64(v, "lease TTL").unwrap_or(0) as i64;
        leases.insert(id.to_be_bytes().to_vec(), LeaseRecord { id: id as i64, ttl, remaining_ttl: 0 }.encode_to_vec());
    }
    bucket(&mut w, b"lease", leases)?;
    let list = match aux.get(keel_server::membership::AUX_MEMBERS) {
        Some(b) => Some(Members::decode(b).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let members = list.as_ref().map(members_json).transpose()?.unwrap_or_default();
    bucket(&mut w, b"members", members)?;
    // etcd's removed members: hex ID -> "removed".
    let removed = list.iter().flat_map(|l| &l.removed).map(|id| (format!("{id:x}").into_bytes(), b"removed".to_vec())).collect();
    bucket(&mut w, b"members_removed", removed)?;
    let compacted = Revision::new(meta.compacted_rev, 0).to_key(false);
    let mut m = BTreeMap::new();
    m.insert(b"consistent_index".to_vec(), meta.consistent_index.to_be_bytes().to_vec());
    m.insert(b"term".to_vec(), meta.term.to_be_bytes().to_vec());
    m.insert(b"storageVersion".to_vec(), storage_version.as_bytes().to_vec());
    if meta.compacted_rev > 0 {
        m.insert(b"finishedCompactRev".to_vec(), compacted.clone());
        m.insert(b"scheduledCompactRev".to_vec(), compacted);
    }
    bucket(&mut w, b"meta", m)?;
    let out = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    Ok(out)
}

/// etcd's snapshot status of a bbolt file: the CRC-32C of every bucket's name followed by its
/// keys and values, the newest revision in `key`, and the number of keys.
pub fn status(db: &keel_bbolt::Db) -> Result<SnapshotStatus> {
    let mut h = 0u32;
    let mut rev = 0i64;
    // Keys live at the end of the history: put by a revision and not deleted by a later one.
    let mut live: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let mut version = None;
    let mut bad = None;
    for name in db.buckets()? {
        let (is_key, is_meta) = (name == b"key", name == b"meta");
        h = crc32c::crc32c_append(h, &name);
        db.for_each(&name, &mut |k, v| {
            h = crc32c::crc32c_append(h, k);
            h = crc32c::crc32c_append(h, v);
            if is_key && bad.is_none() {
                let Some((r, tombstone)) = Revision::from_key(k) else {
                    bad = Some(format!("not a revision key in bucket key: {k:?}"));
                    return Ok(());
                };
                rev = r.main;
                match keel_proto::mvccpb::KeyValue::decode(v) {
                    Ok(kv) if tombstone => {
                        live.remove(&kv.key);
                    }
                    Ok(kv) => {
                        live.insert(kv.key);
                    }
                    Err(e) => bad = Some(format!("undecodable key-value at revision {}: {e}", r.main)),
                }
            }
            if is_meta && k == b"storageVersion" {
                version = std::str::from_utf8(v).ok().and_then(|v| semver::Version::parse(v).ok()).map(|v| v.to_string());
            }
            Ok(())
        })?;
    }
    if let Some(why) = bad {
        bail!("{why}");
    }
    Ok(SnapshotStatus { hash: h, revision: rev, total_keys: live.len(), version })
}

/// What `etcdutl snapshot status` reports of a snapshot (etcd 3.6's and 3.7's rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStatus {
    /// CRC-32C of every bucket's name, keys and values, in order.
    pub hash: u32,
    /// The main revision of the last record in the key bucket.
    pub revision: i64,
    /// Keys live at that revision.
    pub total_keys: usize,
    /// The storage version recorded in the meta bucket, if any.
    pub version: Option<String>,
}

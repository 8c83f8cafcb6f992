//! etcd's v2 store as a raft snapshot's data: JSON of the store's tree, of which only the
//! membership part is left in etcd 3.4 and later: `/0/members/<id>/raftAttributes`
//! (`{"peerURLs":[...],"isLearner":true}`), `/0/members/<id>/attributes`
//! (`{"name":...,"clientURLs":[...]}`), `/0/removed_members/<id>`, `/0/version` (the cluster
//! version), and the empty v2 key space `/1`. etcd 3.5 takes its member list from it; etcd 3.6
//! takes members from the backend but refuses data it cannot load (it stops: "failed to restore
//! v2 store"). Keel writes it into every snapshot it makes, so that the snapshot message it sends
//! an etcd follower is what etcd sends, and reads it from snapshots either kind made.
//!
//! Owns the format only; calls nothing.

use keel_proto::keelpb::MemberRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The membership a v2 store snapshot holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Membership {
    /// Members, in ID order.
    pub members: Vec<MemberRecord>,
    /// IDs under `/0/removed_members`.
    pub removed: Vec<u64>,
    /// `/0/version`, when set.
    pub cluster_version: Option<String>,
}

/// A node of the v2 store tree, in etcd's field order (Go writes them as declared).
#[derive(Serialize, Deserialize, Default)]
struct Node {
    #[serde(rename = "Path", default)]
    path: String,
    #[serde(rename = "CreatedIndex", default)]
    created_index: u64,
    #[serde(rename = "ModifiedIndex", default)]
    modified_index: u64,
    #[serde(rename = "ExpireTime", default = "zero_time")]
    expire_time: String,
    #[serde(rename = "Value", default)]
    value: String,
    #[serde(rename = "Children", default)]
    children: Option<BTreeMap<String, Node>>,
}

/// Go's zero `time.Time` as JSON: a node that never expires.
fn zero_time() -> String {
    "0001-01-01T00:00:00Z".to_string()
}

#[derive(Serialize, Deserialize)]
struct Store {
    #[serde(rename = "Root")]
    root: Node,
    #[serde(rename = "CurrentIndex", default)]
    current_index: u64,
    #[serde(rename = "CurrentVersion", default = "store_version")]
    current_version: u32,
}

fn store_version() -> u32 {
    2
}

#[derive(Serialize, Deserialize, Default)]
struct RaftAttributes {
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(rename = "isLearner", default, skip_serializing_if = "std::ops::Not::not")]
    is_learner: bool,
}

#[derive(Serialize, Deserialize, Default)]
struct Attributes {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    client_urls: Vec<String>,
}

fn leaf(path: String, value: String) -> Node {
    Node { path, expire_time: zero_time(), value, ..Default::default() }
}

fn dir(path: String, children: BTreeMap<String, Node>) -> Node {
    Node { path, expire_time: zero_time(), children: Some(children), ..Default::default() }
}

/// The v2 store JSON holding `m`.
pub fn encode(m: &Membership) -> Vec<u8> {
    let mut members = BTreeMap::new();
    for r in &m.members {
        let hex = format!("{:x}", r.id);
        let base = format!("/0/members/{hex}");
        let mut node = BTreeMap::new();
        let raft = RaftAttributes { peer_urls: r.peer_urls.clone(), is_learner: r.is_learner };
        node.insert("raftAttributes".to_string(), leaf(format!("{base}/raftAttributes"), json(&raft)));
        if !r.name.is_empty() || !r.client_urls.is_empty() {
            let attrs = Attributes { name: r.name.clone(), client_urls: r.client_urls.clone() };
            node.insert("attributes".to_string(), leaf(format!("{base}/attributes"), json(&attrs)));
        }
        members.insert(hex, dir(base, node));
    }
    let mut zero = BTreeMap::new();
    zero.insert("members".to_string(), dir("/0/members".into(), members));
    if !m.removed.is_empty() {
        let removed =
            m.removed.iter().map(|id| (format!("{id:x}"), leaf(format!("/0/removed_members/{id:x}"), "removed".into()))).collect();
        zero.insert("removed_members".to_string(), dir("/0/removed_members".into(), removed));
    }
    if let Some(v) = &m.cluster_version {
        zero.insert("version".to_string(), leaf("/0/version".into(), v.clone()));
    }
    let mut root = BTreeMap::new();
    root.insert("0".to_string(), dir("/0".into(), zero));
    root.insert("1".to_string(), dir("/1".into(), BTreeMap::new()));
    let store = Store { root: dir("/".into(), root), current_index: 0, current_version: 2 };
    serde_json::to_vec(&store).unwrap_or_default()
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Whether snapshot data is v2 store JSON (not an earlier Keel build's protobuf record).
pub fn is_v2_store(data: &[u8]) -> bool {
    data.first() == Some(&b'{')
}

/// The membership in v2 store JSON `data`.
pub fn decode(data: &[u8]) -> Result<Membership, String> {
    let store: Store = serde_json::from_slice(data).map_err(|e| format!("the v2 store is not JSON of etcd's store: {e}"))?;
    let mut out = Membership::default();
    let zero = store.root.children.as_ref().and_then(|c| c.get("0")).and_then(|n| n.children.as_ref());
    let Some(zero) = zero else { return Ok(out) };
    for (hex, m) in zero.get("members").and_then(|n| n.children.as_ref()).into_iter().flatten() {
        let id = u64::from_str_radix(hex, 16).map_err(|_| format!("member {hex:?} is not a hex ID"))?;
        let value = |which: &str| m.children.as_ref().and_then(|c| c.get(which)).map(|n| n.value.as_str()).unwrap_or("{}");
        let raft: RaftAttributes =
            serde_json::from_str(value("raftAttributes")).map_err(|e| format!("member {hex}: raftAttributes: {e}"))?;
        let attrs: Attributes = serde_json::from_str(value("attributes")).map_err(|e| format!("member {hex}: attributes: {e}"))?;
        out.members.push(MemberRecord {
            id,
            name: attrs.name,
            peer_urls: raft.peer_urls,
            client_urls: attrs.client_urls,
            is_learner: raft.is_learner,
        });
    }
    out.members.sort_by_key(|m| m.id);
    for hex in zero.get("removed_members").and_then(|n| n.children.as_ref()).into_iter().flatten().map(|(k, _)| k) {
        out.removed.push(u64::from_str_radix(hex, 16).map_err(|_| format!("removed member {hex:?} is not a hex ID"))?);
    }
    out.cluster_version = zero.get("version").map(|n| n.value.clone());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, name: &str, learner: bool) -> MemberRecord {
        MemberRecord {
            id,
            name: name.into(),
            peer_urls: vec![format!("http://127.0.0.{id}:2380")],
            client_urls: if name.is_empty() { vec![] } else { vec![format!("http://127.0.0.{id}:2379")] },
            is_learner: learner,
        }
    }

    #[test]
    fn membership_round_trips_through_the_v2_store() {
        let m = Membership {
            members: vec![member(1, "a", false), member(2, "", true), member(0xabc, "c", false)],
            removed: vec![7],
            cluster_version: Some("3.6.0".into()),
        };
        let data = encode(&m);
        assert!(is_v2_store(&data));
        assert_eq!(decode(&data).unwrap(), m);
    }

    #[test]
    fn members_are_written_as_etcd_writes_them() {
        let data = encode(&Membership { members: vec![member(2, "", true), member(0xabc, "c", false)], ..Default::default() });
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        let members = &v["Root"]["Children"]["0"]["Children"]["members"]["Children"];
        let learner = &members["2"]["Children"];
        assert_eq!(learner["raftAttributes"]["Value"], "{\"peerURLs\":[\"http://127.0.0.2:2380\"],\"isLearner\":true}");
        assert_eq!(learner["raftAttributes"]["Path"], "/0/members/2/raftAttributes");
        // A member that never started has no attributes node.
        assert!(learner.get("attributes").is_none());
        let c = &members["abc"]["Children"];
        assert_eq!(c["attributes"]["Value"], "{\"name\":\"c\",\"clientURLs\":[\"http://127.0.0.2748:2379\"]}");
        assert_eq!(c["attributes"]["ExpireTime"], "0001-01-01T00:00:00Z");
        // The v2 key space exists and is empty, as etcd 3.6 insists.
        assert_eq!(v["Root"]["Children"]["1"]["Children"], serde_json::json!({}));
        assert_eq!(v["CurrentVersion"], 2);
    }

    #[test]
    fn etcds_own_snapshot_data_is_read() {
        // As etcd 3.5 writes it (abridged: Go also writes WatcherHub and Stats, which are ignored).
        let etcd = br#"{"Root":{"Path":"/","CreatedIndex":0,"ModifiedIndex":0,"ExpireTime":"0001-01-01T00:00:00Z","Value":"","Children":{"0":{"Path":"/0","CreatedIndex":0,"ModifiedIndex":0,"ExpireTime":"0001-01-01T00:00:00Z","Value":"","Children":{"members":{"Path":"/0/members","CreatedIndex":1,"ModifiedIndex":1,"ExpireTime":"0001-01-01T00:00:00Z","Value":"","Children":{"8e9e05c52164694d":{"Path":"/0/members/8e9e05c52164694d","CreatedIndex":1,"ModifiedIndex":1,"ExpireTime":"0001-01-01T00:00:00Z","Value":"","Children":{"attributes":{"Path":"/0/members/8e9e05c52164694d/attributes","CreatedIndex":2,"ModifiedIndex":2,"ExpireTime":"0001-01-01T00:00:00Z","Value":"{\"name\":\"default\",\"clientURLs\":[\"http://localhost:2379\"]}","Children":null},"raftAttributes":{"Path":"/0/members/8e9e05c52164694d/raftAttributes","CreatedIndex":1,"ModifiedIndex":1,"ExpireTime":"0001-01-01T00:00:00Z","Value":"{\"peerURLs\":[\"http://localhost:2380\"]}","Children":null}}}}},"version":{"Path":"/0/version","CreatedIndex":3,"ModifiedIndex":3,"ExpireTime":"0001-01-01T00:00:00Z","Value":"3.5.0","Children":null}}},"1":{"Path":"/1","CreatedIndex":0,"ModifiedIndex":0,"ExpireTime":"0001-01-01T00:00:00Z","Value":"","Children":{}}}},"WatcherHub":{"EventHistory":{"Queue":{"Events":[],"Size":0,"Front":0,"Back":0,"Capacity":1000},"StartIndex":0,"LastIndex":0,"Capacity":1000}},"CurrentIndex":3,"Stats":{"getsSuccess":0},"CurrentVersion":2}"#;
        let m = decode(etcd).unwrap();
        assert_eq!(m.members.len(), 1);
        assert_eq!(m.members[0].id, 0x8e9e05c52164694d);
        assert_eq!(m.members[0].name, "default");
        assert_eq!(m.members[0].client_urls, vec!["http://localhost:2379".to_string()]);
        assert_eq!(m.cluster_version.as_deref(), Some("3.5.0"));
        assert!(decode(b"{not json").is_err());
    }
}

//! Cluster membership: member IDs derived as etcd derives them, the member list, its
//! persistent form (a `keelpb.SnapshotData` record in the backend), and etcd's JSON form of a
//! member (what a membership change's raft entry and etcd's `members` bucket carry).

use keel_proto::etcdserverpb::Member;
use keel_proto::keelpb::{MemberRecord, SnapshotData};
use prost::Message;
use sha1::{Digest, Sha1};

/// A member as etcd writes it as JSON (`membership.Member`): the context of a membership
/// change's raft entry, and etcd's `members` bucket (3.5+).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemberJson {
    // In etcd's field order (Go writes them as declared).
    pub id: u64,
    // Go writes a nil list as `null` (etcd's promotion carries `"peerURLs":null`).
    #[serde(rename = "peerURLs", default, deserialize_with = "null_as_empty")]
    pub peer_urls: Vec<String>,
    #[serde(rename = "isLearner", default, skip_serializing_if = "std::ops::Not::not")]
    pub is_learner: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty", deserialize_with = "null_as_empty")]
    pub client_urls: Vec<String>,
    /// Set in a promotion's record only (etcd's `ConfigChangeContext.IsPromote`): an AddNode of a
    /// learner already there; without it such an add is refused ("ID exists").
    #[serde(rename = "isPromote", default, skip_serializing_if = "std::ops::Not::not")]
    pub is_promote: bool,
}

/// A list Go may have written as `null` (a nil slice).
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    use serde::Deserialize;
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

impl From<MemberJson> for MemberRecord {
    fn from(m: MemberJson) -> MemberRecord {
        MemberRecord { id: m.id, name: m.name, peer_urls: m.peer_urls, client_urls: m.client_urls, is_learner: m.is_learner }
    }
}

impl From<&MemberRecord> for MemberJson {
    fn from(m: &MemberRecord) -> MemberJson {
        MemberJson {
            id: m.id,
            peer_urls: m.peer_urls.clone(),
            name: m.name.clone(),
            client_urls: m.client_urls.clone(),
            is_learner: m.is_learner,
            is_promote: false,
        }
    }
}

impl MemberJson {
    /// The JSON bytes etcd writes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Backend record that holds the membership.
pub const AUX_MEMBERS: &str = "members";
/// The store's aux record holding the applied cluster version ("3.6.0"; the leader decides it:
/// [`crate::cluster_version`]).
pub const AUX_CLUSTER_VERSION: &str = "cluster_version";

/// The store's aux record holding the downgrade etcd's `DowngradeInfoSet` entries set, in the
/// JSON etcd keeps in its backend (`cluster` bucket, key `downgrade`).
pub const AUX_DOWNGRADE: &str = "downgrade";

/// etcd's downgrade info: while enabled, the leader lowers the cluster version to the target, so
/// that members of the target version (etcd one minor release older) can join.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Downgrade {
    #[serde(rename = "target-version", default)]
    pub target_version: String,
    #[serde(default)]
    pub enabled: bool,
}

impl Downgrade {
    /// The downgrade an aux record holds (none when absent or unreadable).
    pub fn parse(record: Option<&[u8]>) -> Downgrade {
        record.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or_default()
    }

    /// The JSON etcd writes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The target version while a downgrade is enabled.
    pub fn target(&self) -> Option<semver::Version> {
        if !self.enabled {
            return None;
        }
        parse_cluster_version(Some(self.target_version.as_bytes()))
    }
}

/// The applied cluster version in an aux record's bytes; None when absent or not a version.
pub fn parse_cluster_version(record: Option<&[u8]>) -> Option<semver::Version> {
    record.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| semver::Version::parse(s.trim()).ok())
}

/// The storage schema version of a backend whose cluster version is `cluster` (major.minor.0):
/// etcd 3.6+ migrates its schema to the cluster version as soon as it is decided (up on an
/// upgrade, down on a downgrade). None while it is undecided.
pub fn storage_version(cluster: Option<&semver::Version>) -> Option<String> {
    cluster.map(|v| format!("{}.{}.0", v.major, v.minor))
}

/// etcd's member ID: the first 8 bytes (big-endian) of SHA-1 over the sorted peer URLs joined,
/// followed by the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut b = urls.join("").into_bytes();
    b.extend_from_slice(token.as_bytes());
    first8(&Sha1::digest(&b))
}

/// etcd's ID for a member added at run time: SHA-1 over the sorted peer URLs and the time.
pub fn new_member_id(peer_urls: &[String], now_unix: u64) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut b = urls.join("").into_bytes();
    b.extend_from_slice(now_unix.to_string().as_bytes());
    first8(&Sha1::digest(&b))
}

/// etcd's cluster ID: SHA-1 over the sorted member IDs (8 bytes big-endian each).
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut b = Vec::with_capacity(8 * ids.len());
    for id in ids {
        b.extend_from_slice(&id.to_be_bytes());
    }
    first8(&Sha1::digest(&b))
}

fn first8(h: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&h[..8]);
    u64::from_be_bytes(a)
}

/// The members of the cluster, in ID order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Members {
    pub cluster_id: u64,
    pub members: Vec<MemberRecord>,
    /// IDs of members removed from the cluster, in ID order: such a member is told so when it
    /// speaks to a peer (etcd answers it 410/403 and it stops), and its ID is never reused.
    pub removed: Vec<u64>,
}

impl Members {
    /// Parses `--initial-cluster` (`name=url,name=url2,...`) into members; a name may appear with
    /// several URLs.
    pub fn from_initial_cluster(s: &str, token: &str) -> Result<Members, String> {
        let mut by_name: Vec<(String, Vec<String>)> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, url) = part.split_once('=').ok_or_else(|| format!("invalid --initial-cluster entry {part:?}: want name=url"))?;
            if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("unix://") || url.starts_with("unixs://")) {
                return Err(format!("invalid --initial-cluster URL {url:?}: URL scheme must be http, https, unix, or unixs"));
            }
            match by_name.iter_mut().find(|(n, _)| n == name) {
                Some((_, urls)) => urls.push(url.to_string()),
                None => by_name.push((name.to_string(), vec![url.to_string()])),
            }
        }
        if by_name.is_empty() {
            return Err("--initial-cluster is empty".into());
        }
        let mut members: Vec<MemberRecord> = by_name
            .into_iter()
            .map(|(name, peer_urls)| MemberRecord {
                id: member_id(&peer_urls, token),
                name,
                peer_urls,
                client_urls: vec![],
                is_learner: false,
            })
            .collect();
        members.sort_by_key(|m| m.id);
        for w in members.windows(2) {
            if w[0].id == w[1].id {
                return Err(format!("member {:x} appears twice in --initial-cluster", w[0].id));
            }
        }
        let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        Ok(Members { cluster_id: cluster_id(&ids), members, removed: vec![] })
    }

    pub fn encode(&self) -> Vec<u8> {
        SnapshotData { cluster_id: self.cluster_id, members: self.members.clone(), removed: self.removed.clone() }.encode_to_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Members, String> {
        let d = SnapshotData::decode(b).map_err(|e| format!("undecodable membership record: {e}"))?;
        Ok(Members { cluster_id: d.cluster_id, members: d.members, removed: d.removed })
    }

    /// A raft snapshot's data for this member list: etcd's v2 store JSON (what etcd members
    /// read from snapshots), marked with `cluster_version`.
    pub fn to_snapshot_data(&self, cluster_version: &str) -> Vec<u8> {
        crate::v2store::encode(&crate::v2store::Membership {
            members: self.members.clone(),
            removed: self.removed.clone(),
            cluster_version: Some(cluster_version.to_string()),
        })
    }

    /// The member list in a raft snapshot's data of cluster `cluster_id`: etcd's v2 store JSON,
    /// or the protobuf record earlier Keel builds wrote.
    pub fn from_snapshot_data(data: &[u8], cluster_id: u64) -> Result<Members, String> {
        if crate::v2store::is_v2_store(data) {
            let m = crate::v2store::decode(data)?;
            return Ok(Members { cluster_id, members: m.members, removed: m.removed });
        }
        Members::decode(data)
    }

    /// Every member's ID, learners included.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.members.iter().map(|m| m.id)
    }

    pub fn get(&self, id: u64) -> Option<&MemberRecord> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut MemberRecord> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Adds a member, or replaces the one with the same ID.
    pub fn upsert(&mut self, m: MemberRecord) {
        match self.get_mut(m.id) {
            Some(old) => *old = m,
            None => {
                self.members.push(m);
                self.members.sort_by_key(|m| m.id);
            }
        }
    }

    /// Removes member `id`, remembering it as removed; false when it is not a member.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.id != id);
        let was = before != self.members.len();
        if was {
            if let Err(at) = self.removed.binary_search(&id) {
                self.removed.insert(at, id);
            }
        }
        was
    }

    /// Whether `id` was a member and was removed.
    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.binary_search(&id).is_ok()
    }

    /// Voting members.
    pub fn voters(&self) -> impl Iterator<Item = &MemberRecord> {
        self.members.iter().filter(|m| !m.is_learner)
    }

    /// The member list as the Cluster API returns it.
    pub fn to_proto(&self) -> Vec<Member> {
        self.members
            .iter()
            .map(|m| Member {
                id: m.id,
                name: m.name.clone(),
                peer_ur_ls: m.peer_urls.clone(),
                client_ur_ls: m.client_urls.clone(),
                is_learner: m.is_learner,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_etcd() {
        // etcd 3.4.23 started with `--name default` and default flags reports member
        // 8e9e05c52164694d in cluster cdf818194e3a8c32.
        let m = Members::from_initial_cluster("default=http://localhost:2380", "etcd-cluster").unwrap();
        assert_eq!(format!("{:x}", m.members[0].id), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", m.cluster_id), "cdf818194e3a8c32");
    }

    #[test]
    fn etcds_promotion_record_with_null_lists_decodes() {
        // What etcd 3.6 puts in a promotion's conf change: a member with no peer URLs, as null.
        let m: MemberJson = serde_json::from_slice(br#"{"id":1445398286534472031,"peerURLs":null,"name":"","clientURLs":null}"#).unwrap();
        assert_eq!((m.id, m.peer_urls.len(), m.client_urls.len(), m.is_learner), (1445398286534472031, 0, 0, false));
    }

    #[test]
    fn bad_initial_cluster() {
        assert!(Members::from_initial_cluster("nourl", "t").is_err());
        assert!(Members::from_initial_cluster("a=ftp://x", "t").is_err());
    }
}

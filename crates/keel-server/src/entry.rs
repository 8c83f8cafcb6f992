//! The data of a normal raft entry: proposals are encoded as etcd's `InternalRaftRequest`
//! (field for field, so an etcd member applies what Keel proposes and the reverse); committed
//! entries decode from it, from etcd's v2 `Request` (etcd 3.5 still proposes the cluster version
//! and a member's attributes that way; taken as etcd 3.6 takes them), or from the encoding
//! earlier Keel builds wrote (their WALs are replayed after an upgrade).
//!
//! Owns the format and nothing else. Calls keel-proto and keel-auth's `AuthInfo` only.

use keel_auth::AuthInfo;
use keel_proto::etcdserverpb::{LeaseCheckpoint, LeaseCheckpointRequest};
use keel_proto::keelpb::{
    internal_raft_request::Request, legacy_request::Request as Legacy, ClusterMemberAttrSetRequest, InternalAuthenticateRequest,
    InternalRaftRequest, LegacyRequest, MemberAttributes, RequestHeader,
};
use prost::Message;

/// A committed request, as the apply stage takes it.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// The proposer's request ID: its caller waits on it (0: nobody waits).
    pub id: u64,
    /// Whose permissions etcd's checks use: the header's user and auth revision (empty when the
    /// request is a member's own or auth was off). `None` only for a member's own request in the
    /// legacy encoding, which was applied unchecked.
    pub who: Option<AuthInfo>,
    pub request: Request,
}

/// Why an entry's data is not a request.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("neither etcd's InternalRaftRequest nor Keel's earlier encoding: {0}")]
    Undecodable(prost::DecodeError),
    /// An etcd request with no field Keel knows (a kind from a newer etcd).
    #[error("an InternalRaftRequest with no request Keel knows")]
    Unknown,
}

/// The entry data of request `id` asked by `who` (an empty `who` for a member's own request).
pub fn encode(id: u64, who: &AuthInfo, request: Request) -> Vec<u8> {
    InternalRaftRequest {
        header: Some(RequestHeader { id, username: who.username.clone(), auth_revision: who.revision }),
        id: 0,
        request: Some(request),
    }
    .encode_to_vec()
}

/// Decodes a normal entry's data (not empty: raft's own empty entries carry no request).
///
/// etcd 3.x sets the header on every request, Keel's earlier encoding never had field 100: an
/// entry with a header is etcd's format; one without is read in the earlier encoding, and as
/// etcd's (pre-3.0, the ID field alone) only when that fails.
pub fn decode(data: &[u8]) -> Result<Decoded, DecodeError> {
    let etcd = InternalRaftRequest::decode(data);
    if let Ok(InternalRaftRequest { header: Some(h), request, .. }) = &etcd {
        let request = request.clone().ok_or(DecodeError::Unknown)?;
        return Ok(Decoded { id: h.id, who: Some(AuthInfo { username: h.username.clone(), revision: h.auth_revision }), request });
    }
    // etcd's v2 entries have no header either; their method and path are unmistakable.
    if let Some(d) = from_v2(data) {
        return Ok(d);
    }
    if let Ok(old) = LegacyRequest::decode(data) {
        if let Some(request) = old.request {
            let who = old.header.map(|h| AuthInfo { username: h.username, revision: h.auth_revision });
            return Ok(Decoded { id: old.id, who, request: from_legacy(request) });
        }
    }
    match etcd {
        Ok(r) => Ok(Decoded { id: r.id, who: Some(AuthInfo::default()), request: r.request.ok_or(DecodeError::Unknown)? }),
        Err(e) => Err(DecodeError::Undecodable(e)),
    }
}

/// etcd's v2 `etcdserverpb.Request`, the fields a v2 entry etcd 3.5 proposes carries (the rest
/// are skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct V2Request {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    method: String,
    #[prost(string, tag = "3")]
    path: String,
    #[prost(string, tag = "4")]
    val: String,
}

/// The member attributes a v2 entry carries as JSON.
#[derive(serde::Deserialize)]
struct V2Attributes {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "clientURLs")]
    client_urls: Vec<String>,
}

/// A v2 entry as etcd 3.6 takes it (`v2ToV3Request`): a PUT of `/0/version` is a cluster version
/// set, a PUT of `/0/members/<hex ID>/attributes` a member's attributes. Anything else is not a
/// v2 entry etcd 3.6 applies (None: not decodable).
fn from_v2(data: &[u8]) -> Option<Decoded> {
    let r = V2Request::decode(data).ok()?;
    if r.method != "PUT" {
        return None;
    }
    let request = if r.path == "/0/version" {
        Request::ClusterVersionSet(keel_proto::keelpb::ClusterVersionSetRequest { ver: r.val })
    } else {
        let hex = r.path.strip_prefix("/0/members/")?.strip_suffix("/attributes")?;
        let member_id = u64::from_str_radix(hex, 16).ok()?;
        let a: V2Attributes = serde_json::from_str(&r.val).ok()?;
        Request::ClusterMemberAttrSet(ClusterMemberAttrSetRequest {
            member_id,
            member_attributes: Some(MemberAttributes { name: a.name, client_urls: a.client_urls }),
        })
    };
    Some(Decoded { id: r.id, who: Some(AuthInfo::default()), request })
}

fn from_legacy(r: Legacy) -> Request {
    match r {
        Legacy::Put(p) => Request::Put(p),
        Legacy::DeleteRange(d) => Request::DeleteRange(d),
        Legacy::Txn(t) => Request::Txn(t),
        Legacy::Compaction(c) => Request::Compaction(c),
        Legacy::MemberAttributes(a) => Request::ClusterMemberAttrSet(ClusterMemberAttrSetRequest {
            member_id: a.id,
            member_attributes: Some(MemberAttributes { name: a.name, client_urls: a.client_urls }),
        }),
        Legacy::MemberUpdate(u) => Request::MemberUpdate(u),
        Legacy::LeaseGrant(g) => Request::LeaseGrant(g),
        Legacy::LeaseRevoke(r) => Request::LeaseRevoke(r),
        Legacy::LeaseCheckpoint(c) => Request::LeaseCheckpoint(LeaseCheckpointRequest {
            checkpoints: c
                .leases
                .into_iter()
                .map(|l| LeaseCheckpoint { id: l.id, remaining_ttl: remaining_seconds(l.remaining_ms) })
                .collect(),
        }),
        Legacy::AuthEnable(a) => Request::AuthEnable(a),
        Legacy::AuthDisable(a) => Request::AuthDisable(a),
        // The earlier encoding failed the entry when auth changed after the password check;
        // etcd's leaves that to the proposer, which is gone after a restart anyway.
        Legacy::Authenticate(a) => {
            Request::Authenticate(InternalAuthenticateRequest { name: a.name, password: String::new(), simple_token: a.simple_token })
        }
        Legacy::AuthUserAdd(u) => Request::AuthUserAdd(u),
        Legacy::AuthUserDelete(u) => Request::AuthUserDelete(u),
        Legacy::AuthUserChangePassword(u) => Request::AuthUserChangePassword(u),
        Legacy::AuthUserGrantRole(g) => Request::AuthUserGrantRole(g),
        Legacy::AuthUserRevokeRole(g) => Request::AuthUserRevokeRole(g),
        Legacy::AuthRoleAdd(r) => Request::AuthRoleAdd(r),
        Legacy::AuthRoleGrantPermission(r) => Request::AuthRoleGrantPermission(r),
        Legacy::AuthRoleRevokePermission(r) => Request::AuthRoleRevokePermission(r),
        Legacy::AuthRoleDelete(r) => Request::AuthRoleDelete(r),
        Legacy::Alarm(a) => Request::Alarm(a),
    }
}

/// A remaining TTL in whole seconds, rounded up, as etcd's lessor checkpoints it.
pub fn remaining_seconds(ms: i64) -> i64 {
    if ms <= 0 {
        0
    } else {
        ms / 1000 + i64::from(ms % 1000 != 0)
    }
}

/// True for the requests that change no state Keel keeps: reads etcd proposes (their proposer
/// answers them) and etcd's downgrade test record.
pub fn changes_nothing(r: &Request) -> bool {
    matches!(
        r,
        Request::Range(_)
            | Request::AuthStatus(_)
            | Request::AuthUserGet(_)
            | Request::AuthUserList(_)
            | Request::AuthRoleGet(_)
            | Request::AuthRoleList(_)
            | Request::DowngradeVersionTest(_)
    )
}

/// The request's name in `etcd_server_apply_duration_seconds{op}` and in logs.
pub fn op_name(r: &Request) -> &'static str {
    match r {
        Request::V2(_) => "V2",
        Request::Range(_) => "Range",
        Request::Put(_) => "Put",
        Request::DeleteRange(_) => "DeleteRange",
        Request::Txn(_) => "Txn",
        Request::Compaction(_) => "Compaction",
        Request::LeaseGrant(_) => "LeaseGrant",
        Request::LeaseRevoke(_) => "LeaseRevoke",
        Request::Alarm(_) => "Alarm",
        Request::LeaseCheckpoint(_) => "LeaseCheckpoint",
        Request::AuthEnable(_) => "AuthEnable",
        Request::AuthDisable(_) => "AuthDisable",
        Request::Authenticate(_) => "Authenticate",
        Request::AuthStatus(_) => "AuthStatus",
        Request::AuthUserAdd(_) => "AuthUserAdd",
        Request::AuthUserDelete(_) => "AuthUserDelete",
        Request::AuthUserGet(_) => "AuthUserGet",
        Request::AuthUserChangePassword(_) => "AuthUserChangePassword",
        Request::AuthUserGrantRole(_) => "AuthUserGrantRole",
        Request::AuthUserRevokeRole(_) => "AuthUserRevokeRole",
        Request::AuthUserList(_) => "AuthUserList",
        Request::AuthRoleList(_) => "AuthRoleList",
        Request::AuthRoleAdd(_) => "AuthRoleAdd",
        Request::AuthRoleDelete(_) => "AuthRoleDelete",
        Request::AuthRoleGet(_) => "AuthRoleGet",
        Request::AuthRoleGrantPermission(_) => "AuthRoleGrantPermission",
        Request::AuthRoleRevokePermission(_) => "AuthRoleRevokePermission",
        Request::ClusterVersionSet(_) => "ClusterVersionSet",
        Request::ClusterMemberAttrSet(_) => "ClusterMemberAttrSet",
        Request::DowngradeInfoSet(_) => "DowngradeInfoSet",
        Request::DowngradeVersionTest(_) => "DowngradeVersionTest",
        Request::MemberUpdate(_) => "ClusterMemberUpdate",
    }
}

/// A v2 request that publishes member attributes (`PUT /0/members/<hex id>/attributes` with
/// `{"name":..,"clientURLs":[..]}`, as etcd 3.4 proposes): the member and its attributes.
pub fn v2_member_attributes(method: &str, path: &str, val: &str) -> Option<(u64, MemberAttributes)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if method != "PUT" || parts.len() != 4 || parts[0] != "0" || parts[1] != "members" || parts[3] != "attributes" {
        return None;
    }
    let id = u64::from_str_radix(parts[2], 16).ok()?;
    let a: serde_json::Value = serde_json::from_str(val).ok()?;
    let name = a.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
    let client_urls = a
        .get("clientURLs")
        .and_then(|c| c.as_array())
        .map(|c| c.iter().filter_map(|u| u.as_str().map(String::from)).collect())
        .unwrap_or_default();
    Some((id, MemberAttributes { name, client_urls }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb::{LeaseRevokeRequest, PutRequest};
    use keel_proto::keelpb::{LegacyHeader, LegacyLeaseCheckpoints, LegacyLeaseRemaining, LegacyMemberAttributes};

    /// `InternalRaftRequest{Header: {ID: 7, Username: "u", AuthRevision: 3}, Put: {Key: "k",
    /// Value: "v"}}` as etcd's generated marshaller (api v3.6.16) writes it: fields in number
    /// order, put (4) first, then header (100, tag bytes a2 06).
    const ETCD_PUT: &[u8] = &[0x22, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v', 0xa2, 0x06, 0x07, 0x08, 0x07, 0x12, 0x01, b'u', 0x18, 0x03];

    #[test]
    fn etcds_bytes_decode_and_keels_encoding_is_etcds() {
        let put = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() };
        let d = decode(ETCD_PUT).unwrap();
        assert_eq!(d, Decoded { id: 7, who: Some(AuthInfo { username: "u".into(), revision: 3 }), request: Request::Put(put.clone()) });
        let mine = encode(7, &AuthInfo { username: "u".into(), revision: 3 }, Request::Put(put));
        // Same fields, same values (prost writes the header first; field order is free).
        assert_eq!(InternalRaftRequest::decode(mine.as_slice()).unwrap(), InternalRaftRequest::decode(ETCD_PUT).unwrap());
        let mut sorted = mine.clone();
        sorted.sort_unstable();
        let mut theirs = ETCD_PUT.to_vec();
        theirs.sort_unstable();
        assert_eq!(sorted, theirs, "the same bytes, up to field order");
    }

    #[test]
    fn a_members_own_request_is_checked_as_etcd_checks_it() {
        let data = encode(9, &AuthInfo::default(), Request::LeaseRevoke(LeaseRevokeRequest { id: 5 }));
        let d = decode(&data).unwrap();
        assert_eq!(d.who, Some(AuthInfo::default()));
        assert_eq!(d.id, 9);
    }

    #[test]
    fn earlier_keel_entries_still_decode() {
        let old = LegacyRequest {
            id: 11,
            request: Some(Legacy::DeleteRange(keel_proto::etcdserverpb::DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: b"b".to_vec(),
                prev_kv: true,
            })),
            header: Some(LegacyHeader { username: "x".into(), auth_revision: 2 }),
        };
        let d = decode(&old.encode_to_vec()).unwrap();
        assert_eq!(d.id, 11);
        assert_eq!(d.who, Some(AuthInfo { username: "x".into(), revision: 2 }));
        assert!(matches!(d.request, Request::DeleteRange(ref r) if r.prev_kv && r.key == b"a"));
        // A member's own request: unchecked, as it was applied then.
        let old = LegacyRequest {
            id: 0,
            request: Some(Legacy::LeaseCheckpoint(LegacyLeaseCheckpoints {
                leases: vec![LegacyLeaseRemaining { id: 3, remaining_ms: 1500 }],
            })),
            header: None,
        };
        let d = decode(&old.encode_to_vec()).unwrap();
        assert_eq!(d.who, None);
        assert_eq!(
            d.request,
            Request::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints: vec![LeaseCheckpoint { id: 3, remaining_ttl: 2 }] })
        );
        let old = LegacyRequest {
            id: 4,
            request: Some(Legacy::MemberAttributes(LegacyMemberAttributes { id: 8, name: "n".into(), client_urls: vec!["u".into()] })),
            header: None,
        };
        assert!(matches!(decode(&old.encode_to_vec()).unwrap().request, Request::ClusterMemberAttrSet(ref a) if a.member_id == 8));
    }

    #[test]
    fn garbage_and_unknown_requests_are_errors() {
        assert!(matches!(decode(&[0xff, 0xff, 0xff]), Err(DecodeError::Undecodable(_))));
        // A header and nothing Keel knows (a field from a newer etcd).
        let unknown = [0xa2, 0x06, 0x02, 0x08, 0x01, 0xf8, 0xff, 0x07, 0x01];
        assert!(matches!(decode(&unknown), Err(DecodeError::Unknown)));
    }

    #[test]
    fn v2_attribute_requests_are_read() {
        let (id, a) =
            v2_member_attributes("PUT", "/0/members/8e9e05c52164694d/attributes", r#"{"name":"n1","clientURLs":["http://a:2379"]}"#)
                .unwrap();
        assert_eq!(id, 0x8e9e05c52164694d);
        assert_eq!(a, MemberAttributes { name: "n1".into(), client_urls: vec!["http://a:2379".into()] });
        assert_eq!(v2_member_attributes("PUT", "/0/version", "3.4.0"), None);
    }

    #[test]
    fn checkpoints_round_up_to_seconds() {
        assert_eq!(remaining_seconds(0), 0);
        assert_eq!(remaining_seconds(-5), 0);
        assert_eq!(remaining_seconds(1), 1);
        assert_eq!(remaining_seconds(1000), 1);
        assert_eq!(remaining_seconds(1001), 2);
    }

    /// etcd 3.5's v2 entries (its cluster version and a member's attributes), as etcd encodes
    /// them, decode as the requests etcd 3.6 makes of them. Found rolling Keel into an etcd 3.5.36
    /// cluster: the joining Keel member stopped at the cluster version entry.
    #[test]
    fn etcd_3_5_v2_entries_decode_as_etcd_3_6_takes_them() {
        let v2 = |id: u64, path: &str, val: &str| {
            super::V2Request { id, method: "PUT".into(), path: path.into(), val: val.into() }.encode_to_vec()
        };
        let d = decode(&v2(7, "/0/version", "3.5.0")).unwrap();
        assert_eq!(d.id, 7);
        assert_eq!(d.request, Request::ClusterVersionSet(keel_proto::keelpb::ClusterVersionSetRequest { ver: "3.5.0".into() }));
        let d = decode(&v2(8, "/0/members/8e9e05c52164694d/attributes", r#"{"name":"e1","clientURLs":["http://a:2379"]}"#)).unwrap();
        assert_eq!(
            d.request,
            Request::ClusterMemberAttrSet(ClusterMemberAttrSetRequest {
                member_id: 0x8e9e05c52164694d,
                member_attributes: Some(MemberAttributes { name: "e1".into(), client_urls: vec!["http://a:2379".into()] }),
            })
        );
        assert!(decode(&v2(9, "/1/foo", "bar")).is_err(), "a v2 key-space write is not an entry etcd 3.6 applies");
    }
}

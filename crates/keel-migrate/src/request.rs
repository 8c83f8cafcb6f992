//! etcd's raft requests (`etcdserverpb.InternalRaftRequest`, 3.4 to 3.7) in Keel's terms, for
//! the entries of an etcd WAL past its backend's consistent index: each becomes the Keel request
//! that has the same effect when applied, or nothing (reads, v2 and cluster-version requests,
//! authentications, which change no state Keel keeps), or a change to the member list
//! (published member attributes).

use anyhow::{bail, Result};
use keel_proto::etcdserverpb as pb;
use keel_proto::keelpb::{internal_request::Request, InternalRequest, LeaseCheckpoints, LeaseRemaining, RequestHeader};
use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
struct EtcdHeader {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    username: String,
    #[prost(uint64, tag = "3")]
    auth_revision: u64,
}

/// etcd's v2 request (3.4 publishes member attributes with one).
#[derive(Clone, PartialEq, prost::Message)]
struct V2Request {
    #[prost(string, tag = "2")]
    method: String,
    #[prost(string, tag = "3")]
    path: String,
    #[prost(string, tag = "4")]
    val: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MemberAttrSet {
    #[prost(uint64, tag = "1")]
    member_id: u64,
    #[prost(message, optional, tag = "2")]
    attributes: Option<Attributes>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Attributes {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, repeated, tag = "2")]
    client_urls: Vec<String>,
}

/// Fields of `InternalRaftRequest` that carry no state Keel keeps; only their presence counts.
#[derive(Clone, PartialEq, prost::Message)]
struct Present {}

#[derive(Clone, PartialEq, prost::Message)]
struct EtcdRequest {
    #[prost(message, optional, tag = "100")]
    header: Option<EtcdHeader>,
    #[prost(message, optional, tag = "2")]
    v2: Option<V2Request>,
    #[prost(message, optional, tag = "3")]
    range: Option<Present>,
    #[prost(message, optional, tag = "4")]
    put: Option<pb::PutRequest>,
    #[prost(message, optional, tag = "5")]
    delete_range: Option<pb::DeleteRangeRequest>,
    #[prost(message, optional, tag = "6")]
    txn: Option<pb::TxnRequest>,
    #[prost(message, optional, tag = "7")]
    compaction: Option<pb::CompactionRequest>,
    #[prost(message, optional, tag = "8")]
    lease_grant: Option<pb::LeaseGrantRequest>,
    #[prost(message, optional, tag = "9")]
    lease_revoke: Option<pb::LeaseRevokeRequest>,
    #[prost(message, optional, tag = "10")]
    alarm: Option<pb::AlarmRequest>,
    #[prost(message, optional, tag = "11")]
    lease_checkpoint: Option<pb::LeaseCheckpointRequest>,
    #[prost(message, optional, tag = "1000")]
    auth_enable: Option<pb::AuthEnableRequest>,
    #[prost(message, optional, tag = "1011")]
    auth_disable: Option<pb::AuthDisableRequest>,
    #[prost(message, optional, tag = "1012")]
    authenticate: Option<Present>,
    #[prost(message, optional, tag = "1013")]
    auth_status: Option<Present>,
    #[prost(message, optional, tag = "1100")]
    auth_user_add: Option<pb::AuthUserAddRequest>,
    #[prost(message, optional, tag = "1101")]
    auth_user_delete: Option<pb::AuthUserDeleteRequest>,
    #[prost(message, optional, tag = "1102")]
    auth_user_get: Option<Present>,
    #[prost(message, optional, tag = "1103")]
    auth_user_change_password: Option<pb::AuthUserChangePasswordRequest>,
    #[prost(message, optional, tag = "1104")]
    auth_user_grant_role: Option<pb::AuthUserGrantRoleRequest>,
    #[prost(message, optional, tag = "1105")]
    auth_user_revoke_role: Option<pb::AuthUserRevokeRoleRequest>,
    #[prost(message, optional, tag = "1106")]
    auth_user_list: Option<Present>,
    #[prost(message, optional, tag = "1107")]
    auth_role_list: Option<Present>,
    #[prost(message, optional, tag = "1200")]
    auth_role_add: Option<pb::AuthRoleAddRequest>,
    #[prost(message, optional, tag = "1201")]
    auth_role_delete: Option<pb::AuthRoleDeleteRequest>,
    #[prost(message, optional, tag = "1202")]
    auth_role_get: Option<Present>,
    #[prost(message, optional, tag = "1203")]
    auth_role_grant_permission: Option<pb::AuthRoleGrantPermissionRequest>,
    #[prost(message, optional, tag = "1204")]
    auth_role_revoke_permission: Option<pb::AuthRoleRevokePermissionRequest>,
    #[prost(message, optional, tag = "1300")]
    cluster_version_set: Option<Present>,
    #[prost(message, optional, tag = "1301")]
    cluster_member_attr_set: Option<MemberAttrSet>,
    #[prost(message, optional, tag = "1302")]
    downgrade_info_set: Option<Present>,
}

/// What one etcd request becomes.
#[derive(Debug, PartialEq)]
pub enum Translated {
    /// A Keel request with the same effect.
    Request(Box<InternalRequest>),
    /// A member published its name and client URLs.
    Attributes { id: u64, name: String, client_urls: Vec<String> },
    /// Nothing Keel keeps changes.
    Nothing,
}

/// bcrypt cost for a password etcd 3.4 logged in plain text (etcd's default).
const BCRYPT_COST: u32 = 10;

/// Translates the data of an etcd normal entry.
pub fn translate(data: &[u8]) -> Result<Translated> {
    let r = match EtcdRequest::decode(data) {
        Ok(r) => r,
        // etcd 3.4 proposes v2 requests bare, not inside an InternalRaftRequest (and reads them
        // the same way: an entry that is not an InternalRaftRequest is a v2 request).
        Err(e) => match V2Request::decode(data) {
            Ok(v2) if !v2.method.is_empty() => EtcdRequest { v2: Some(v2), ..Default::default() },
            _ => bail!("undecodable etcd request: {e}"),
        },
    };
    let header = r
        .header
        .as_ref()
        .filter(|h| !h.username.is_empty())
        .map(|h| RequestHeader { username: h.username.clone(), auth_revision: h.auth_revision });
    let req =
        |request: Request| Ok(Translated::Request(Box::new(InternalRequest { id: 0, request: Some(request), header: header.clone() })));
    if let Some(v2) = r.v2 {
        let parts: Vec<&str> = v2.path.trim_matches('/').split('/').collect();
        if v2.method == "PUT" && parts.len() == 4 && parts[0] == "0" && parts[1] == "members" && parts[3] == "attributes" {
            let id = u64::from_str_radix(parts[2], 16).map_err(|_| anyhow::anyhow!("v2 member path {:?}", v2.path))?;
            let a: serde_json::Value = serde_json::from_str(&v2.val).unwrap_or_default();
            let name = a.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
            let client_urls = a
                .get("clientURLs")
                .and_then(|c| c.as_array())
                .map(|c| c.iter().filter_map(|u| u.as_str().map(String::from)).collect())
                .unwrap_or_default();
            return Ok(Translated::Attributes { id, name, client_urls });
        }
        return Ok(Translated::Nothing);
    }
    if let Some(m) = r.cluster_member_attr_set {
        let a = m.attributes.unwrap_or_default();
        return Ok(Translated::Attributes { id: m.member_id, name: a.name, client_urls: a.client_urls });
    }
    if let Some(p) = r.put {
        return req(Request::Put(p));
    }
    if let Some(d) = r.delete_range {
        return req(Request::DeleteRange(d));
    }
    if let Some(t) = r.txn {
        return req(Request::Txn(t));
    }
    if let Some(c) = r.compaction {
        return req(Request::Compaction(c));
    }
    if let Some(g) = r.lease_grant {
        return req(Request::LeaseGrant(g));
    }
    if let Some(g) = r.lease_revoke {
        return req(Request::LeaseRevoke(g));
    }
    if let Some(a) = r.alarm {
        return req(Request::Alarm(a));
    }
    if let Some(c) = r.lease_checkpoint {
        let leases =
            c.checkpoints.iter().map(|c| LeaseRemaining { id: c.id, remaining_ms: c.remaining_ttl.saturating_mul(1000) }).collect();
        return req(Request::LeaseCheckpoint(LeaseCheckpoints { leases }));
    }
    if let Some(a) = r.auth_enable {
        return req(Request::AuthEnable(a));
    }
    if let Some(a) = r.auth_disable {
        return req(Request::AuthDisable(a));
    }
    if let Some(mut u) = r.auth_user_add {
        if u.hashed_password.is_empty() && !u.password.is_empty() {
            u.hashed_password = bcrypt::hash(std::mem::take(&mut u.password), BCRYPT_COST)?;
        }
        u.password.clear();
        return req(Request::AuthUserAdd(u));
    }
    if let Some(u) = r.auth_user_delete {
        return req(Request::AuthUserDelete(u));
    }
    if let Some(mut u) = r.auth_user_change_password {
        if u.hashed_password.is_empty() && !u.password.is_empty() {
            u.hashed_password = bcrypt::hash(std::mem::take(&mut u.password), BCRYPT_COST)?;
        }
        u.password.clear();
        return req(Request::AuthUserChangePassword(u));
    }
    if let Some(g) = r.auth_user_grant_role {
        return req(Request::AuthUserGrantRole(g));
    }
    if let Some(g) = r.auth_user_revoke_role {
        return req(Request::AuthUserRevokeRole(g));
    }
    if let Some(a) = r.auth_role_add {
        return req(Request::AuthRoleAdd(a));
    }
    if let Some(a) = r.auth_role_delete {
        return req(Request::AuthRoleDelete(a));
    }
    if let Some(a) = r.auth_role_grant_permission {
        return req(Request::AuthRoleGrantPermission(a));
    }
    if let Some(a) = r.auth_role_revoke_permission {
        return req(Request::AuthRoleRevokePermission(a));
    }
    let reads = [&r.range, &r.authenticate, &r.auth_status, &r.auth_user_get, &r.auth_user_list, &r.auth_role_list, &r.auth_role_get];
    if reads.iter().any(|p| p.is_some()) || r.cluster_version_set.is_some() || r.downgrade_info_set.is_some() {
        return Ok(Translated::Nothing);
    }
    bail!("an etcd request Keel does not know")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_meaning() {
        let put = pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() };
        let data = EtcdRequest {
            put: Some(put.clone()),
            header: Some(EtcdHeader { id: 7, username: "u".into(), auth_revision: 3 }),
            ..Default::default()
        }
        .encode_to_vec();
        match translate(&data).unwrap() {
            Translated::Request(r) => {
                assert_eq!(r.request, Some(Request::Put(put)));
                assert_eq!(r.header, Some(RequestHeader { username: "u".into(), auth_revision: 3 }));
            }
            other => panic!("{other:?}"),
        }
        let v2 = V2Request {
            method: "PUT".into(),
            path: "/0/members/8e9e05c52164694d/attributes".into(),
            val: r#"{"name":"n1","clientURLs":["http://a:2379"]}"#.into(),
        };
        let data = EtcdRequest { v2: Some(v2), ..Default::default() }.encode_to_vec();
        assert_eq!(
            translate(&data).unwrap(),
            Translated::Attributes { id: 0x8e9e05c52164694d, name: "n1".into(), client_urls: vec!["http://a:2379".into()] }
        );
        let data = EtcdRequest { cluster_version_set: Some(Present {}), ..Default::default() }.encode_to_vec();
        assert_eq!(translate(&data).unwrap(), Translated::Nothing);
        // A bare v2 request, as etcd 3.4 proposes them.
        let bare =
            V2Request { method: "PUT".into(), path: "/0/members/1/attributes".into(), val: r#"{"name":"x"}"#.into() }.encode_to_vec();
        assert_eq!(translate(&bare).unwrap(), Translated::Attributes { id: 1, name: "x".into(), client_urls: vec![] });
        assert!(translate(&[0xff, 0xff]).is_err());
        assert!(translate(&EtcdRequest::default().encode_to_vec()).is_err(), "an empty request is not known");
    }
}

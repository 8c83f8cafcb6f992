//! etcd's raft requests (`etcdserverpb.InternalRaftRequest`, 3.4 to 3.7) for the entries of an
//! etcd WAL past its backend's consistent index. Keel's entries are etcd's encoding, so most
//! are taken as they are; what 3.4 wrote differently is made what 3.5+ writes (bare v2
//! requests, plain-text passwords hashed); reads and downgrade records, which change no state
//! Keel keeps, are left out; published member attributes change the member list.

use anyhow::{bail, Result};
use keel_proto::keelpb::{internal_raft_request::Request, InternalRaftRequest, V2Request};
use keel_server::entry::{changes_nothing, decode, v2_member_attributes, DecodeError};
use prost::Message;

/// What one etcd request becomes.
#[derive(Debug, PartialEq)]
pub enum Translated {
    /// A request to apply, in Keel's (etcd 3.5+'s) encoding.
    Request(Box<InternalRaftRequest>),
    /// A member published its name and client URLs.
    Attributes { id: u64, name: String, client_urls: Vec<String> },
    /// Nothing Keel keeps changes.
    Nothing,
}

/// bcrypt cost for a password etcd 3.4 logged in plain text (etcd's default).
const BCRYPT_COST: u32 = 10;

/// Translates the data of an etcd normal entry.
pub fn translate(data: &[u8]) -> Result<Translated> {
    let d = match decode(data) {
        Ok(d) => d,
        Err(DecodeError::Unknown) => bail!("an etcd request Keel does not know"),
        // etcd 3.4 proposes v2 requests bare, not inside an InternalRaftRequest (and reads them
        // the same way: an entry that is not an InternalRaftRequest is a v2 request).
        Err(DecodeError::Undecodable(e)) => match V2Request::decode(data) {
            Ok(v2) if !v2.method.is_empty() => return Ok(v2_translated(&v2)),
            _ => bail!("undecodable etcd request: {e}"),
        },
    };
    let request = match d.request {
        Request::V2(v2) => return Ok(v2_translated(&v2)),
        Request::ClusterMemberAttrSet(m) => {
            let a = m.member_attributes.unwrap_or_default();
            return Ok(Translated::Attributes { id: m.member_id, name: a.name, client_urls: a.client_urls });
        }
        Request::AuthUserAdd(mut u) => {
            if u.hashed_password.is_empty() && !u.password.is_empty() {
                u.hashed_password = bcrypt::hash(std::mem::take(&mut u.password), BCRYPT_COST)?;
            }
            u.password.clear();
            Request::AuthUserAdd(u)
        }
        Request::AuthUserChangePassword(mut u) => {
            if u.hashed_password.is_empty() && !u.password.is_empty() {
                u.hashed_password = bcrypt::hash(std::mem::take(&mut u.password), BCRYPT_COST)?;
            }
            u.password.clear();
            Request::AuthUserChangePassword(u)
        }
        // Tokens do not outlive a conversion either.
        ref r if changes_nothing(r) || matches!(r, Request::Authenticate(_)) => return Ok(Translated::Nothing),
        Request::MemberUpdate(_) => bail!("a Keel-only member update in an etcd WAL"),
        other => other,
    };
    let who = d.who.unwrap_or_default();
    let header = keel_proto::keelpb::RequestHeader { id: d.id, username: who.username, auth_revision: who.revision };
    Ok(Translated::Request(Box::new(InternalRaftRequest { header: Some(header), id: 0, request: Some(request) })))
}

fn v2_translated(v2: &V2Request) -> Translated {
    match v2_member_attributes(&v2.method, &v2.path, &v2.val) {
        Some((id, a)) => Translated::Attributes { id, name: a.name, client_urls: a.client_urls },
        None => Translated::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb as pb;
    use keel_proto::keelpb::{ClusterVersionSetRequest, RequestHeader};

    fn etcd(request: Request, header: Option<RequestHeader>) -> Vec<u8> {
        InternalRaftRequest { header, id: 0, request: Some(request) }.encode_to_vec()
    }

    #[test]
    fn requests_keep_their_meaning() {
        let put = pb::PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() };
        let data = etcd(Request::Put(put.clone()), Some(RequestHeader { id: 7, username: "u".into(), auth_revision: 3 }));
        match translate(&data).unwrap() {
            Translated::Request(r) => {
                assert_eq!(r.request, Some(Request::Put(put)));
                assert_eq!(r.header, Some(RequestHeader { id: 7, username: "u".into(), auth_revision: 3 }));
            }
            other => panic!("{other:?}"),
        }
        let v2 = V2Request {
            id: 0,
            method: "PUT".into(),
            path: "/0/members/8e9e05c52164694d/attributes".into(),
            val: r#"{"name":"n1","clientURLs":["http://a:2379"]}"#.into(),
        };
        let data = etcd(Request::V2(v2), Some(RequestHeader::default()));
        assert_eq!(
            translate(&data).unwrap(),
            Translated::Attributes { id: 0x8e9e05c52164694d, name: "n1".into(), client_urls: vec!["http://a:2379".into()] }
        );
        // The cluster version is kept (etcd members of a mixed cluster need it).
        let data = etcd(Request::ClusterVersionSet(ClusterVersionSetRequest { ver: "3.6.0".into() }), Some(RequestHeader::default()));
        match translate(&data).unwrap() {
            Translated::Request(r) => assert!(matches!(r.request, Some(Request::ClusterVersionSet(ref v)) if v.ver == "3.6.0")),
            other => panic!("{other:?}"),
        }
        // So is a downgrade (etcd 3.5 members joining later need it).
        let d = keel_proto::keelpb::DowngradeInfoSetRequest { enabled: true, ver: "3.5.0".into() };
        match translate(&etcd(Request::DowngradeInfoSet(d.clone()), Some(RequestHeader::default()))).unwrap() {
            Translated::Request(r) => assert_eq!(r.request, Some(Request::DowngradeInfoSet(d))),
            other => panic!("{other:?}"),
        }
        // A bare v2 request, as etcd 3.4 proposes them.
        let bare = V2Request { id: 9, method: "PUT".into(), path: "/0/members/1/attributes".into(), val: r#"{"name":"x"}"#.into() }
            .encode_to_vec();
        assert_eq!(translate(&bare).unwrap(), Translated::Attributes { id: 1, name: "x".into(), client_urls: vec![] });
        assert!(translate(&[0xff, 0xff]).is_err());
        let empty = InternalRaftRequest { header: Some(RequestHeader::default()), ..Default::default() }.encode_to_vec();
        assert!(translate(&empty).is_err(), "an empty request is not known");
        // etcd 3.4 logged user passwords in plain text: they are hashed.
        let add = pb::AuthUserAddRequest { name: "a".into(), password: "pw".into(), ..Default::default() };
        match translate(&etcd(Request::AuthUserAdd(add), Some(RequestHeader::default()))).unwrap() {
            Translated::Request(r) => match r.request {
                Some(Request::AuthUserAdd(u)) => {
                    assert!(u.password.is_empty());
                    assert!(bcrypt::verify("pw", &u.hashed_password).unwrap());
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}

//! The request checks of the gRPC handlers, in process: KV requests through the API's shape checks
//! (`keel_api::api::validate`) and then etcd's KV semantics, Auth requests through the auth store,
//! Lease grants and revokes through the lessor. Requests are decoded from the input as tonic
//! decodes them (invalid UTF-8 in a name is refused there). No panic; a refused request changes
//! nothing (the revision, the auth revision and the lease set stay).
#![no_main]
use keel_auth::store::AuthStore;
use keel_lease::Lessor;
use keel_mvcc::kv::{self, Leases};
use keel_mvcc::Store;
use keel_proto::etcdserverpb::*;
use libfuzzer_sys::fuzz_target;
use prost::Message;

struct View<'a>(&'a Lessor);
impl Leases for View<'_> {
    fn exists(&self, id: i64) -> bool {
        self.0.exists(id)
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(&dir.path().join("db")).expect("store");
    let mut auth = AuthStore::load(&store);
    let mut lessor = Lessor::default();
    let mut rest = data;
    // Requests: [kind u8][len u16][protobuf] ...
    while rest.len() >= 3 {
        let kind = rest[0] % 16;
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let end = (3 + len).min(rest.len());
        let body = &rest[3..end];
        rest = &rest[end..];
        let (rev, auth_rev, leases) = (store.current_rev(), auth.revision(), lessor.ids());
        let refused = match kind {
            0 => RangeRequest::decode(body).ok().map(|r| keel_api::api::validate::range(&r).is_err() || kv::range(&store, &r).is_err()),
            1 => PutRequest::decode(body).ok().map(|r| {
                keel_api::api::validate::put(&r).is_err() || {
                    let mut w = store.write();
                    let res = kv::put(&mut w, &r, &View(&lessor));
                    w.finish();
                    res.is_err()
                }
            }),
            2 => DeleteRangeRequest::decode(body).ok().map(|r| {
                keel_api::api::validate::delete_range(&r).is_err() || {
                    let mut w = store.write();
                    let res = kv::delete_range(&mut w, &r);
                    w.finish();
                    res.is_err()
                }
            }),
            3 => TxnRequest::decode(body).ok().map(|r| {
                keel_api::api::validate::txn(&r, 128).is_err() || {
                    let mut w = store.write();
                    let res = kv::txn(&mut w, &r, &View(&lessor));
                    w.finish();
                    res.is_err()
                }
            }),
            4 => AuthUserAddRequest::decode(body).ok().map(|r| auth.user_add(&mut store, &r.name, b"$2b$04$hash", r.options).is_err()),
            5 => AuthUserDeleteRequest::decode(body).ok().map(|r| auth.user_delete(&mut store, &r.name).is_err()),
            6 => AuthUserChangePasswordRequest::decode(body).ok().map(|r| auth.user_change_password(&mut store, &r.name, b"$2b$04$other").is_err()),
            7 => AuthUserGrantRoleRequest::decode(body).ok().map(|r| auth.user_grant_role(&mut store, &r.user, &r.role).is_err()),
            8 => AuthUserRevokeRoleRequest::decode(body).ok().map(|r| auth.user_revoke_role(&mut store, &r.name, &r.role).is_err()),
            9 => AuthRoleAddRequest::decode(body).ok().map(|r| auth.role_add(&mut store, &r.name).is_err()),
            10 => AuthRoleDeleteRequest::decode(body).ok().map(|r| auth.role_delete(&mut store, &r.role).is_err()),
            11 => AuthRoleGrantPermissionRequest::decode(body).ok().map(|r| auth.role_grant_permission(&mut store, &r.name, r.perm).is_err()),
            12 => AuthRoleRevokePermissionRequest::decode(body)
                .ok()
                .map(|r| auth.role_revoke_permission(&mut store, &r.role, &r.key, &r.range_end).is_err()),
            13 => Some(if body.first().is_some_and(|b| b & 1 == 1) { auth.enable(&mut store).is_err() } else { !auth.disable(&mut store) }),
            14 => LeaseGrantRequest::decode(body).ok().map(|r| lessor.grant(r.id, r.ttl).is_err()),
            _ => LeaseRevokeRequest::decode(body).ok().map(|r| lessor.revoke(r.id).is_err()),
        };
        if refused == Some(true) {
            assert_eq!(store.current_rev(), rev, "a refused request changed the revision");
            assert_eq!(auth.revision(), auth_rev, "a refused request changed the auth revision");
            assert_eq!(lessor.ids(), leases, "a refused request changed the leases");
        }
        assert!(store.current_rev() >= rev, "revision went backwards");
    }
});

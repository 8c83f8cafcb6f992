//! The auth store: enabled flag, revision, users and roles, and each user's merged permissions.
//!
//! Every change happens while a raft entry is applied, so all members hold the same store; each
//! change that etcd counts bumps the auth revision and is written to the backend's auxiliary
//! records in the same batch as the entry's consistent index.

use super::perm::{interval, RangeSet};
use super::{AuthError, AuthInfo};
use keel_mvcc::Store;
use keel_proto::authpb::{permission::Type as PermType, Permission, Role, User, UserAddOptions};
use prost::Message;
use std::collections::{BTreeMap, HashMap};

pub const ROOT: &str = "root";
pub const AUX_ENABLED: &str = "auth/enabled";
pub const AUX_REVISION: &str = "auth/revision";
pub const AUX_USER: &str = "auth/users/";
pub const AUX_ROLE: &str = "auth/roles/";

/// What an operation needs on a key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    Read,
    Write,
}

#[derive(Default, Debug)]
struct UserPerms {
    read: RangeSet,
    write: RangeSet,
}

#[derive(Default, Debug)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
    perms: HashMap<String, UserPerms>,
}

fn has_root_role(u: &User) -> bool {
    u.roles.iter().any(|r| r == ROOT)
}

impl AuthStore {
    /// Reads the auth records of `store`.
    pub fn load(store: &Store) -> AuthStore {
        let mut a = AuthStore {
            enabled: store.aux(AUX_ENABLED) == Some(&[1][..]),
            revision: store.aux(AUX_REVISION).and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0),
            ..Default::default()
        };
        for (name, v) in store.aux_prefix(AUX_USER) {
            match User::decode(v) {
                Ok(u) => {
                    a.users.insert(name[AUX_USER.len()..].to_string(), u);
                }
                Err(e) => tracing::error!(record = name, error = %e, "auth: undecodable user record ignored"),
            }
        }
        for (name, v) in store.aux_prefix(AUX_ROLE) {
            match Role::decode(v) {
                Ok(r) => {
                    a.roles.insert(name[AUX_ROLE.len()..].to_string(), r);
                }
                Err(e) => tracing::error!(record = name, error = %e, "auth: undecodable role record ignored"),
            }
        }
        a.refresh_perms();
        a
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn refresh_perms(&mut self) {
        self.perms.clear();
        for (name, u) in &self.users {
            let (mut read, mut write) = (Vec::new(), Vec::new());
            for role in u.roles.iter().filter_map(|r| self.roles.get(r)) {
                for p in &role.key_permission {
                    let iv = interval(&p.key, &p.range_end);
                    match PermType::try_from(p.perm_type).unwrap_or(PermType::Read) {
                        PermType::Read => read.push(iv),
                        PermType::Write => write.push(iv),
                        PermType::Readwrite => {
                            read.push(iv.clone());
                            write.push(iv);
                        }
                    }
                }
            }
            self.perms.insert(name.clone(), UserPerms { read: RangeSet::from_intervals(read), write: RangeSet::from_intervals(write) });
        }
    }

    fn commit_revision(&mut self, store: &mut Store) {
        self.revision += 1;
        store.set_aux(AUX_REVISION, self.revision.to_be_bytes().to_vec());
    }

    fn save_user(&self, store: &mut Store, name: &str) {
        match self.users.get(name) {
            Some(u) => store.set_aux(&format!("{AUX_USER}{name}"), u.encode_to_vec()),
            None => store.delete_aux(&format!("{AUX_USER}{name}")),
        }
    }

    fn save_role(&self, store: &mut Store, name: &str) {
        match self.roles.get(name) {
            Some(r) => store.set_aux(&format!("{AUX_ROLE}{name}"), r.encode_to_vec()),
            None => store.delete_aux(&format!("{AUX_ROLE}{name}")),
        }
    }

    /// A user or role change: new revision, persisted, permissions recomputed.
    fn changed(&mut self, store: &mut Store, user: Option<&str>, role: Option<&str>) {
        if let Some(u) = user {
            self.save_user(store, u);
        }
        if let Some(r) = role {
            self.save_role(store, r);
        }
        self.commit_revision(store);
        self.refresh_perms();
    }

    // ---- Checks ----

    /// etcd's `isOpPermitted`: may `info` do `perm` on `key`..`range_end`?
    pub fn check(&self, info: &AuthInfo, key: &[u8], range_end: &[u8], perm: Perm) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if info.revision == 0 {
            return Err(AuthError::UserEmpty);
        }
        if info.revision < self.revision {
            return Err(AuthError::OldRevision);
        }
        let user = self.users.get(&info.username).ok_or(AuthError::PermissionDenied)?;
        if has_root_role(user) {
            return Ok(());
        }
        let p = self.perms.get(&info.username).ok_or(AuthError::PermissionDenied)?;
        let set = match perm {
            Perm::Read => &p.read,
            Perm::Write => &p.write,
        };
        if set.allows(key, range_end) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied)
        }
    }

    /// etcd's `IsAdminPermitted`: the caller has the root role.
    pub fn check_admin(&self, info: &AuthInfo) -> Result<(), AuthError> {
        if !self.enabled {
            return Ok(());
        }
        if info.username.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        let u = self.users.get(&info.username).ok_or(AuthError::UserNotFound)?;
        if !has_root_role(u) {
            return Err(AuthError::PermissionDenied);
        }
        Ok(())
    }

    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// The stored bcrypt hash of a password user, for checking a password outside any lock.
    pub fn password_hash(&self, name: &str) -> Result<(Vec<u8>, u64), AuthError> {
        if !self.enabled {
            return Err(AuthError::AuthNotEnabled);
        }
        let u = self.users.get(name).ok_or(AuthError::AuthFailed)?;
        if u.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(AuthError::AuthFailed);
        }
        Ok((u.password.clone(), self.revision))
    }

    // ---- Reads ----

    pub fn user_roles(&self, name: &str) -> Result<Vec<String>, AuthError> {
        self.users.get(name).map(|u| u.roles.clone()).ok_or(AuthError::UserNotFound)
    }

    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn role_perms(&self, name: &str) -> Result<Vec<Permission>, AuthError> {
        self.roles.get(name).map(|r| r.key_permission.clone()).ok_or(AuthError::RoleNotFound)
    }

    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    // ---- Changes (applied entries) ----

    pub fn enable(&mut self, store: &mut Store) -> Result<(), AuthError> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
        if !has_root_role(root) {
            return Err(AuthError::RootRoleNotExist);
        }
        self.enabled = true;
        store.set_aux(AUX_ENABLED, vec![1]);
        tracing::info!("enabled authentication");
        Ok(())
    }

    /// Returns true when auth was on (the caller then drops every token).
    pub fn disable(&mut self, store: &mut Store) -> bool {
        if !self.enabled {
            return false;
        }
        self.enabled = false;
        store.set_aux(AUX_ENABLED, vec![0]);
        self.commit_revision(store);
        tracing::info!("disabled authentication");
        true
    }

    /// Adds a user; `hashed` is the bcrypt hash (empty for `no_password` users).
    pub fn user_add(&mut self, store: &mut Store, name: &str, hashed: &[u8], options: Option<UserAddOptions>) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(AuthError::UserAlreadyExist);
        }
        let options = options.unwrap_or_default();
        let password = if options.no_password { Vec::new() } else { hashed.to_vec() };
        self.users.insert(name.to_string(), User { name: name.as_bytes().to_vec(), password, roles: Vec::new(), options: Some(options) });
        self.changed(store, Some(name), None);
        tracing::info!(user_name = name, "added a user");
        Ok(())
    }

    pub fn user_delete(&mut self, store: &mut Store, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidMgmt);
        }
        if self.users.remove(name).is_none() {
            return Err(AuthError::UserNotFound);
        }
        self.changed(store, Some(name), None);
        tracing::info!(user_name = name, "deleted a user");
        Ok(())
    }

    pub fn user_change_password(&mut self, store: &mut Store, name: &str, hashed: &[u8]) -> Result<(), AuthError> {
        let u = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
        u.password = hashed.to_vec();
        self.changed(store, Some(name), None);
        tracing::info!(user_name = name, "changed a password of a user");
        Ok(())
    }

    pub fn user_grant_role(&mut self, store: &mut Store, name: &str, role: &str) -> Result<(), AuthError> {
        if !self.users.contains_key(name) {
            return Err(AuthError::UserNotFound);
        }
        if role != ROOT && !self.roles.contains_key(role) {
            return Err(AuthError::RoleNotFound);
        }
        let u = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
        match u.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => return Ok(()),
            Err(i) => u.roles.insert(i, role.to_string()),
        }
        self.changed(store, Some(name), None);
        tracing::info!(user_name = name, role_name = role, "granted a role to a user");
        Ok(())
    }

    pub fn user_revoke_role(&mut self, store: &mut Store, name: &str, role: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT && role == ROOT {
            return Err(AuthError::InvalidMgmt);
        }
        let u = self.users.get_mut(name).ok_or(AuthError::UserNotFound)?;
        let before = u.roles.len();
        u.roles.retain(|r| r != role);
        if u.roles.len() == before {
            return Err(AuthError::RoleNotGranted);
        }
        self.changed(store, Some(name), None);
        tracing::info!(user_name = name, role_name = role, "revoked a role from a user");
        Ok(())
    }

    pub fn role_add(&mut self, store: &mut Store, name: &str) -> Result<(), AuthError> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(AuthError::RoleAlreadyExist);
        }
        self.roles.insert(name.to_string(), Role { name: name.as_bytes().to_vec(), key_permission: Vec::new() });
        self.changed(store, None, Some(name));
        tracing::info!(role_name = name, "created a role");
        Ok(())
    }

    pub fn role_delete(&mut self, store: &mut Store, name: &str) -> Result<(), AuthError> {
        if self.enabled && name == ROOT {
            return Err(AuthError::InvalidMgmt);
        }
        if self.roles.remove(name).is_none() {
            return Err(AuthError::RoleNotFound);
        }
        let holders: Vec<String> = self.users.iter().filter(|(_, u)| u.roles.iter().any(|r| r == name)).map(|(n, _)| n.clone()).collect();
        for h in &holders {
            if let Some(u) = self.users.get_mut(h) {
                u.roles.retain(|r| r != name);
            }
            self.save_user(store, h);
        }
        self.changed(store, None, Some(name));
        tracing::info!(role_name = name, "deleted a role");
        Ok(())
    }

    pub fn role_grant_permission(&mut self, store: &mut Store, name: &str, perm: Option<Permission>) -> Result<(), AuthError> {
        let perm = perm.ok_or(AuthError::PermissionNotGiven)?;
        let role = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
        match role.key_permission.iter_mut().find(|p| p.key == perm.key && p.range_end == perm.range_end) {
            Some(p) => p.perm_type = perm.perm_type,
            None => {
                role.key_permission.push(Permission { perm_type: perm.perm_type, key: perm.key, range_end: perm.range_end });
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        self.changed(store, None, Some(name));
        tracing::info!(role_name = name, "granted/updated a permission to a role");
        Ok(())
    }

    pub fn role_revoke_permission(&mut self, store: &mut Store, name: &str, key: &[u8], range_end: &[u8]) -> Result<(), AuthError> {
        let role = self.roles.get_mut(name).ok_or(AuthError::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission.retain(|p| p.key != key || p.range_end != range_end);
        if role.key_permission.len() == before {
            return Err(AuthError::PermissionNotGranted);
        }
        self.changed(store, None, Some(name));
        tracing::info!(role_name = name, "revoked a permission on range");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        (dir, s)
    }

    fn rw(key: &[u8], end: &[u8]) -> Option<Permission> {
        Some(Permission { perm_type: PermType::Readwrite as i32, key: key.to_vec(), range_end: end.to_vec() })
    }

    #[test]
    fn enable_needs_root_with_root_role() {
        let (_d, mut s) = store();
        let mut a = AuthStore::default();
        assert_eq!(a.enable(&mut s), Err(AuthError::RootUserNotExist));
        a.user_add(&mut s, "root", b"h", None).unwrap();
        assert_eq!(a.enable(&mut s), Err(AuthError::RootRoleNotExist));
        a.user_grant_role(&mut s, "root", "root").unwrap();
        a.enable(&mut s).unwrap();
        assert_eq!(a.user_delete(&mut s, "root"), Err(AuthError::InvalidMgmt));
        assert_eq!(a.user_revoke_role(&mut s, "root", "root"), Err(AuthError::InvalidMgmt));
        assert_eq!(a.role_delete(&mut s, "root"), Err(AuthError::InvalidMgmt));
    }

    #[test]
    fn permissions_follow_roles_and_survive_reload() {
        let (_d, mut s) = store();
        let mut a = AuthStore::default();
        a.user_add(&mut s, "root", b"h", None).unwrap();
        a.user_grant_role(&mut s, "root", "root").unwrap();
        a.user_add(&mut s, "u", b"h", None).unwrap();
        a.role_add(&mut s, "r").unwrap();
        a.role_grant_permission(&mut s, "r", rw(b"a", b"c")).unwrap();
        a.user_grant_role(&mut s, "u", "r").unwrap();
        a.enable(&mut s).unwrap();
        let rev = a.revision();
        let u = AuthInfo { username: "u".into(), revision: rev };
        assert_eq!(a.check(&u, b"b", b"", Perm::Write), Ok(()));
        assert_eq!(a.check(&u, b"c", b"", Perm::Read), Err(AuthError::PermissionDenied));
        assert_eq!(a.check(&AuthInfo::default(), b"b", b"", Perm::Read), Err(AuthError::UserEmpty));
        assert_eq!(a.check_admin(&u), Err(AuthError::PermissionDenied));
        let b = AuthStore::load(&s);
        assert!(b.enabled() && b.revision() == rev);
        assert_eq!(b.check(&u, b"b", b"", Perm::Write), Ok(()));
        a.role_delete(&mut s, "r").unwrap();
        assert_eq!(a.user_roles("u").unwrap(), Vec::<String>::new());
        let u2 = AuthInfo { username: "u".into(), revision: a.revision() };
        assert_eq!(a.check(&u, b"b", b"", Perm::Write), Err(AuthError::OldRevision));
        assert_eq!(a.check(&u2, b"b", b"", Perm::Write), Err(AuthError::PermissionDenied));
        assert_eq!(a.role_revoke_permission(&mut s, "r", b"a", b"c"), Err(AuthError::RoleNotFound));
    }
}

//! etcdserverpb.Auth: enable/disable, authenticate, users and roles.
//!
//! Changes go through raft and are permission-checked when applied (root role needed once auth is
//! on); reads are served locally after a linearizable barrier, with etcd's rules on who may read
//! what. Passwords are bcrypt-hashed here, before proposal: the log never holds a plain password.

use crate::errors;
use keel_auth::{AuthError, AuthInfo};
use keel_proto::etcdserverpb::auth_server::Auth;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::internal_raft_request::Request;
use keel_proto::keelpb::InternalAuthenticateRequest;
use keel_server::apply::Applied;
use keel_server::server::Server;
use std::sync::Arc;
use tonic::{Request as GrpcRequest, Response, Status};

pub struct AuthService {
    pub server: Arc<Server>,
}

async fn bcrypt_hash(password: String, cost: u32) -> Result<String, Status> {
    tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("etcdserver: failed to hash password: {e}")))
}

impl AuthService {
    /// Proposes an auth change on behalf of the caller and returns the revision it was applied at.
    async fn change<T>(&self, req: &GrpcRequest<T>, r: Request) -> Result<Option<ResponseHeader>, Status> {
        let s = &self.server;
        let who = crate::api::caller(s, req)?;
        s.not_learner().map_err(crate::errors::status)?;
        match s.propose_as(r, &who).await.map_err(crate::errors::status)? {
            (Applied::Auth, rev) => Ok(s.header(rev)),
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    /// The caller of a read, after the barrier that makes the read linearizable.
    async fn reader<T>(&self, req: &GrpcRequest<T>) -> Result<AuthInfo, Status> {
        let who = crate::api::caller(&self.server, req)?;
        self.server.linearizable_barrier().await.map_err(crate::errors::status)?;
        Ok(who)
    }

    fn header(&self) -> Option<ResponseHeader> {
        self.server.header(self.server.store().current_rev())
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, req: GrpcRequest<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self.change(&req, Request::AuthEnable(AuthEnableRequest {})).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(&self, req: GrpcRequest<AuthDisableRequest>) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.change(&req, Request::AuthDisable(AuthDisableRequest {})).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(&self, req: GrpcRequest<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        self.reader(&req).await?;
        let a = self.server.auth();
        let (enabled, auth_revision) = (a.enabled(), a.revision());
        drop(a);
        Ok(Response::new(AuthStatusResponse { header: self.header(), enabled, auth_revision }))
    }

    async fn authenticate(&self, req: GrpcRequest<AuthenticateRequest>) -> Result<Response<AuthenticateResponse>, Status> {
        let s = &self.server;
        s.linearizable_barrier().await.map_err(crate::errors::status)?;
        let r = req.into_inner();
        // An auth change between the password check and the token's entry (its revision moved)
        // makes the check run again, as etcd's does; the token already assigned stays until it
        // expires.
        for _ in 0..3 {
            let (hash, checked_revision) = s.auth().password_hash(&r.name).map_err(errors::auth)?;
            let password = r.password.clone();
            let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &String::from_utf8_lossy(&hash)).unwrap_or(false))
                .await
                .unwrap_or(false);
            if !ok {
                tracing::info!(user_name = %r.name, "invalid password");
                return Err(errors::auth(AuthError::AuthFailed));
            }
            if !s.tokens().is_simple() {
                let token = s.tokens().sign_jwt(&r.name, checked_revision).map_err(Status::internal)?;
                return Ok(Response::new(AuthenticateResponse { header: self.header(), token }));
            }
            let token = s.tokens().new_simple_token(s.next_seq());
            let entry = InternalAuthenticateRequest { name: r.name.clone(), password: String::new(), simple_token: token.clone() };
            let (_, rev) = s.propose(Request::Authenticate(entry)).await.map_err(errors::status)?;
            if s.auth().revision() == checked_revision {
                return Ok(Response::new(AuthenticateResponse { header: s.header(rev), token }));
            }
            tracing::info!(user_name = %r.name, "revision when password checked became stale; retrying");
        }
        Err(errors::auth(AuthError::OldRevision))
    }

    async fn user_add(&self, req: GrpcRequest<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        if req.get_ref().name.is_empty() {
            return Err(errors::auth(AuthError::UserEmpty));
        }
        let mut r = req.get_ref().clone();
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        r.hashed_password =
            if no_password { String::new() } else { bcrypt_hash(std::mem::take(&mut r.password), self.server.cfg().bcrypt_cost).await? };
        r.password.clear();
        let header = self.change(&req, Request::AuthUserAdd(r)).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(&self, req: GrpcRequest<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let who = self.reader(&req).await?;
        let a = self.server.auth();
        let name = &req.get_ref().name;
        if let Err(e) = a.check_admin(&who) {
            if *name != who.username {
                return Err(errors::auth(e));
            }
        }
        let roles = a.user_roles(name).map_err(errors::auth)?;
        drop(a);
        Ok(Response::new(AuthUserGetResponse { header: self.header(), roles }))
    }

    async fn user_list(&self, req: GrpcRequest<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        let who = self.reader(&req).await?;
        let a = self.server.auth();
        a.check_admin(&who).map_err(errors::auth)?;
        let users = a.user_names();
        drop(a);
        Ok(Response::new(AuthUserListResponse { header: self.header(), users }))
    }

    async fn user_delete(&self, req: GrpcRequest<AuthUserDeleteRequest>) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthUserDelete(r)).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: GrpcRequest<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let mut r = req.get_ref().clone();
        r.hashed_password = bcrypt_hash(std::mem::take(&mut r.password), self.server.cfg().bcrypt_cost).await?;
        let header = self.change(&req, Request::AuthUserChangePassword(r)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(&self, req: GrpcRequest<AuthUserGrantRoleRequest>) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthUserGrantRole(r)).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(&self, req: GrpcRequest<AuthUserRevokeRoleRequest>) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthUserRevokeRole(r)).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, req: GrpcRequest<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        if req.get_ref().name.is_empty() {
            return Err(errors::auth(AuthError::RoleEmpty));
        }
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthRoleAdd(r)).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, req: GrpcRequest<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let who = self.reader(&req).await?;
        let a = self.server.auth();
        let role = &req.get_ref().role;
        if let Err(e) = a.check_admin(&who) {
            if !a.has_role(&who.username, role) {
                return Err(errors::auth(e));
            }
        }
        let perm = a.role_perms(role).map_err(errors::auth)?;
        drop(a);
        Ok(Response::new(AuthRoleGetResponse { header: self.header(), perm }))
    }

    async fn role_list(&self, req: GrpcRequest<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        let who = self.reader(&req).await?;
        let a = self.server.auth();
        a.check_admin(&who).map_err(errors::auth)?;
        let roles = a.role_names();
        drop(a);
        Ok(Response::new(AuthRoleListResponse { header: self.header(), roles }))
    }

    async fn role_delete(&self, req: GrpcRequest<AuthRoleDeleteRequest>) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthRoleDelete(r)).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: GrpcRequest<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        if req.get_ref().perm.is_none() {
            return Err(errors::auth(AuthError::PermissionNotGiven));
        }
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthRoleGrantPermission(r)).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: GrpcRequest<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let r = req.get_ref().clone();
        let header = self.change(&req, Request::AuthRoleRevokePermission(r)).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}

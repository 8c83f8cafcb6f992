//! etcdserverpb.Cluster: member list and membership changes through raft, with etcd's strict
//! reconfiguration checks (`--strict-reconfig-check`).

use crate::errors;
use keel_proto::etcdserverpb::cluster_server::Cluster;
use keel_proto::etcdserverpb::*;
use keel_proto::keelpb::MemberRecord;
use keel_raft::wire::ChangeKind;
use keel_server::apply::Applied;
use keel_server::membership::new_member_id;
use keel_server::rafthttp::Transport;
use keel_server::server::Server;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// etcd's HealthInterval: a peer counts as connected once its stream has been up this long.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

pub struct ClusterService {
    pub server: Arc<Server>,
    pub transport: Transport,
}

fn valid_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(errors::invalid_member_urls());
    }
    for u in urls {
        let ok = match u.split_once("://") {
            Some(("http" | "https" | "unix" | "unixs", rest)) => {
                let hp = rest.trim_end_matches('/');
                !hp.is_empty()
                    && !hp.contains('/')
                    && hp.rsplit_once(':').map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()).unwrap_or(false)
            }
            _ => false,
        };
        if !ok {
            return Err(errors::invalid_member_urls());
        }
    }
    Ok(())
}

fn members_of(applied: Applied) -> Result<Vec<Member>, Status> {
    match applied {
        Applied::Members(m) => Ok(m),
        _ => Err(Status::internal("etcdserver: unexpected apply result")),
    }
}

impl ClusterService {
    /// Connected to `id` for at least the health interval.
    fn connected(&self, id: u64, cutoff: Instant) -> bool {
        id == self.server.member_id() || self.transport.active_since(id).map(|t| t <= cutoff).unwrap_or(false)
    }

    /// etcd 3.6's strict reconfiguration check for an added member (voter or learner): a voter
    /// needs a quorum of started members counting it, and either needs this member connected
    /// (for the health interval) to a quorum of the voters with the new member counted as down.
    fn may_add(&self, learner: bool) -> Result<(), Status> {
        if !self.server.cfg().strict_reconfig_check {
            return Ok(());
        }
        let members = self.server.members();
        let voters: Vec<_> = members.voters().collect();
        let quorum = |n: usize| n / 2 + 1;
        if !learner {
            let nmembers = voters.len() + 1;
            let nstarted = voters.iter().filter(|m| !m.name.is_empty()).count();
            if !(nstarted == 1 && nmembers == 2) && nstarted < quorum(nmembers) {
                return Err(errors::not_enough_started());
            }
        }
        if voters.len() == 1 {
            return Ok(());
        }
        let cutoff = Instant::now().checked_sub(HEALTH_INTERVAL).unwrap_or_else(Instant::now);
        if voters.iter().filter(|m| self.connected(m.id, cutoff)).count() < quorum(voters.len() + 1) {
            return Err(errors::unhealthy());
        }
        Ok(())
    }

    fn may_remove(&self, id: u64) -> Result<(), Status> {
        if !self.server.cfg().strict_reconfig_check {
            return Ok(());
        }
        let members = self.server.members();
        if members.get(id).map(|m| m.is_learner).unwrap_or(false) {
            return Ok(());
        }
        let voters: Vec<_> = members.voters().collect();
        let others: Vec<_> = voters.iter().filter(|m| m.id != id).collect();
        let nstarted = others.iter().filter(|m| !m.name.is_empty()).count();
        if nstarted < others.len() / 2 + 1 {
            return Err(errors::not_enough_started());
        }
        // A member that is down is not part of the active quorum: removing it is safe.
        if id != self.server.member_id() && self.transport.active_since(id).is_none() {
            return Ok(());
        }
        let cutoff = Instant::now().checked_sub(HEALTH_INTERVAL).unwrap_or_else(Instant::now);
        let active = voters.iter().filter(|m| self.connected(m.id, cutoff)).count();
        if active < 2 + (voters.len() - 1) / 2 {
            return Err(errors::unhealthy());
        }
        Ok(())
    }
}

/// Checks and proposes the promotion of a learner; runs on the leader.
pub async fn promote(server: &Server, id: u64) -> Result<Vec<Member>, Status> {
    server.promote_learner(id).await.map_err(crate::errors::status)
}

// etcd's cluster server answers with a header that carries no revision (0): so does Keel's.
#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        let r = req.into_inner();
        valid_urls(&r.peer_ur_ls)?;
        let s = &self.server;
        {
            let members = s.members();
            if members.members.iter().any(|m| m.peer_urls.iter().any(|u| r.peer_ur_ls.contains(u))) {
                return Err(errors::peer_url_exists());
            }
            if r.is_learner && members.members.iter().filter(|m| m.is_learner).count() >= 1 {
                return Err(errors::too_many_learners());
            }
        }
        self.may_add(r.is_learner)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let id = new_member_id(&r.peer_ur_ls, now);
        if s.members().get(id).is_some() {
            return Err(errors::member_exists());
        }
        let rec = MemberRecord { id, name: String::new(), peer_urls: r.peer_ur_ls.clone(), client_urls: vec![], is_learner: r.is_learner };
        let change = if r.is_learner { ChangeKind::AddLearnerNode } else { ChangeKind::AddNode };
        let (applied, _) = s.propose_conf_change(change, id, Some(rec)).await.map_err(crate::errors::status)?;
        let members = members_of(applied)?;
        let member = members.iter().find(|m| m.id == id).cloned();
        Ok(Response::new(MemberAddResponse { header: s.header(0), member, members }))
    }

    async fn member_remove(&self, req: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        let id = req.into_inner().id;
        let s = &self.server;
        if s.members().get(id).is_none() {
            return Err(errors::member_not_found());
        }
        self.may_remove(id)?;
        let (applied, _) = s.propose_conf_change(ChangeKind::RemoveNode, id, None).await.map_err(crate::errors::status)?;
        Ok(Response::new(MemberRemoveResponse { header: s.header(0), members: members_of(applied)? }))
    }

    async fn member_update(&self, req: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        let r = req.into_inner();
        valid_urls(&r.peer_ur_ls)?;
        let s = &self.server;
        {
            let members = s.members();
            if members.get(r.id).is_none() {
                return Err(errors::member_not_found());
            }
            if members.members.iter().any(|m| m.id != r.id && m.peer_urls.iter().any(|u| r.peer_ur_ls.contains(u))) {
                return Err(errors::peer_url_exists());
            }
        }
        // etcd's update: a conf change whose member record carries the new peer URLs.
        let rec = MemberRecord { id: r.id, peer_urls: r.peer_ur_ls, ..Default::default() };
        let (applied, _) = s.propose_conf_change(ChangeKind::UpdateNode, r.id, Some(rec)).await.map_err(crate::errors::status)?;
        Ok(Response::new(MemberUpdateResponse { header: s.header(0), members: members_of(applied)? }))
    }

    async fn member_list(&self, req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        if req.get_ref().linearizable {
            self.server.linearizable_barrier().await.map_err(crate::errors::status)?;
        }
        let members = self.server.members().to_proto();
        Ok(Response::new(MemberListResponse { header: self.server.header(0), members }))
    }

    async fn member_promote(&self, req: Request<MemberPromoteRequest>) -> Result<Response<MemberPromoteResponse>, Status> {
        self.server.check_admin(&crate::api::caller(&self.server, &req)?).map_err(crate::errors::status)?;
        let id = req.into_inner().id;
        let s = &self.server;
        let members = if s.raft().is_leader() {
            promote(s, id).await?
        } else {
            let leader = s.raft().leader();
            if leader == 0 {
                return Err(errors::no_leader());
            }
            self.transport.forward_promote(leader, id).await.map_err(crate::errors::status)?
        };
        Ok(Response::new(MemberPromoteResponse { header: s.header(0), members }))
    }
}

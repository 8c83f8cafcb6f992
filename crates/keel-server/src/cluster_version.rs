//! The cluster version, decided as etcd's leader decides it: the lowest server version among
//! the members (each asked on its peer URLs' `/version`), as major.minor.0, proposed as etcd's
//! `ClusterVersionSet` when the cluster has none yet or a lower one, or the target of an enabled
//! downgrade (etcd's `Downgrade` ENABLE), which it cancels once every member runs the target
//! version. etcd members of a mixed cluster need it: until one is applied they refuse client
//! requests as "not capable", and an etcd member older than the cluster version refuses to join.
//!
//! Owns the decision only. The applied version is the state machine's (an aux record the apply
//! stage writes, [`crate::membership::AUX_CLUSTER_VERSION`]). Calls the server to read and
//! propose, the peer transport to ask members for their versions.

use crate::rafthttp::Transport;
use crate::server::Server;
use keel_proto::keelpb::internal_raft_request::Request;
use keel_proto::keelpb::{ClusterVersionSetRequest, DowngradeInfoSetRequest};
use semver::Version;
use std::sync::Arc;
use std::time::Duration;

/// etcd's `monitorVersionInterval`: the leader checks the versions this often.
const INTERVAL: Duration = Duration::from_secs(4);
/// How often a member checks while the cluster has no version yet (etcd checks at the first
/// commit of a term; a new cluster gets its version as soon as it has a leader).
const UNDECIDED_INTERVAL: Duration = Duration::from_millis(20);
/// etcd's `MinClusterVersion`: what a leader proposes when the cluster has no version and some
/// member's version cannot be learned.
const MIN_CLUSTER_VERSION: Version = Version::new(3, 0, 0);

/// etcd's decision (`decideClusterVersion`). `current`: the applied cluster version; `lowest`:
/// the lowest server version of the members, None when some member's is unknown; `downgrade`:
/// the target of an enabled downgrade. The version to propose, major.minor.0, or None to leave it.
pub fn decide(current: Option<&Version>, lowest: Option<&Version>, downgrade: Option<&Version>) -> Option<Version> {
    let cut = |v: &Version| Version::new(v.major, v.minor, 0);
    match (current, lowest) {
        (None, Some(l)) => Some(cut(l)),
        (None, None) => Some(MIN_CLUSTER_VERSION),
        (Some(_), None) => None,
        (Some(c), Some(l)) => match downgrade.map(cut) {
            Some(t) if t == cut(c) => None,
            // Down by one minor release, from the cluster version and from every member's.
            Some(t) => (is_valid_downgrade(c, &t) && is_valid_downgrade(l, &t)).then_some(t),
            // An upgrade within a major version only (etcd's IsValidClusterVersionChange).
            None => {
                let (c, l) = (cut(c), cut(l));
                (c.major == l.major && c < l).then_some(l)
            }
        },
    }
}

/// etcd's `isValidDowngrade`: `to` is one minor release below `from`.
pub fn is_valid_downgrade(from: &Version, to: &Version) -> bool {
    from.minor > 0 && (to.major, to.minor) == (from.major, from.minor - 1)
}

/// etcd's `versionsMatchTarget`: every member runs the target's major.minor.
fn all_at(versions: &[Version], target: &Version) -> bool {
    versions.iter().all(|v| (v.major, v.minor) == (target.major, target.minor))
}

/// `"3.6"`: how etcd logs a cluster version.
fn major_minor(v: &Version) -> String {
    format!("{}.{}", v.major, v.minor)
}

/// The server version of every member (this one's is Keel's etcd version), None when some
/// member does not answer.
async fn server_versions(server: &Server, transport: &Transport) -> Option<Vec<Version>> {
    let me = server.member_id();
    let ids: Vec<u64> = server.members().ids().collect();
    let own = Version::parse(keel_config::ETCD_VERSION).ok()?;
    let mut versions = vec![own.clone()];
    for id in ids.into_iter().filter(|id| *id != me) {
        let v = transport.server_version(id).await?;
        if v > own {
            tracing::debug!(remote_member_id = format!("{id:x}"), remote_member_version = %v, "leader found higher-versioned member");
        }
        versions.push(v);
    }
    Some(versions)
}

/// The leader's loop: every [`INTERVAL`], when this member leads, proposes the version
/// [`decide`] gives. Runs until the runtime stops.
pub async fn run(server: Arc<Server>, transport: Transport) {
    loop {
        let current = server.cluster_version();
        tokio::time::sleep(if current.is_some() { INTERVAL } else { UNDECIDED_INTERVAL }).await;
        if !server.raft().is_leader() {
            continue;
        }
        let versions = server_versions(&server, &transport).await;
        // Leadership or the version may have changed while members were asked.
        let current = server.cluster_version();
        if !server.raft().is_leader() {
            continue;
        }
        let lowest = versions.as_ref().and_then(|v| v.iter().min().cloned());
        let target = server.downgrade().target();
        if let Some(next) = decide(current.as_ref(), lowest.as_ref(), target.as_ref()) {
            match &current {
                None => tracing::info!(cluster_version = %major_minor(&next), "setting up initial cluster version using v3 API"),
                Some(c) => tracing::info!(from = %major_minor(c), to = %major_minor(&next), "updating cluster version using v3 API"),
            }
            match server.propose(Request::ClusterVersionSet(ClusterVersionSetRequest { ver: next.to_string() })).await {
                Ok(_) => tracing::info!(cluster_version = %major_minor(&next), "cluster version is updated"),
                Err(e) => tracing::warn!(error = %e, "failed to update cluster version"),
            }
        } else if let (Some(t), Some(c)) = (&target, &current) {
            if (t.major, t.minor) != (c.major, c.minor) && lowest.is_some() {
                tracing::error!(downgrade_target = %t, cluster_version = %c, "Cannot downgrade from cluster-version to downgrade-target");
            }
        }
        // etcd's CancelDowngradeIfNeeded: every member runs the target version.
        if let (Some(t), Some(vs)) = (&target, &versions) {
            if all_at(vs, t) {
                tracing::info!(cluster_version = %t, "the cluster has been downgraded");
                let cancel = Request::DowngradeInfoSet(DowngradeInfoSetRequest { enabled: false, ver: String::new() });
                if let Err(e) = server.propose(cancel).await {
                    tracing::warn!(error = %e, "failed to cancel downgrade");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn a_new_cluster_takes_its_lowest_member_version() {
        assert_eq!(decide(None, Some(&v("3.6.16")), None), Some(v("3.6.0")));
        assert_eq!(decide(None, Some(&v("3.5.21")), None), Some(v("3.5.0")));
        // Some member's version unknown: etcd's minimum.
        assert_eq!(decide(None, None, None), Some(v("3.0.0")));
    }

    #[test]
    fn a_version_only_rises_within_its_major_once_every_member_is_newer() {
        assert_eq!(decide(Some(&v("3.5.0")), Some(&v("3.6.16")), None), Some(v("3.6.0")));
        assert_eq!(decide(Some(&v("3.6.0")), Some(&v("3.6.16")), None), None);
        assert_eq!(decide(Some(&v("3.6.0")), Some(&v("3.5.21")), None), None, "never lowered");
        assert_eq!(decide(Some(&v("3.6.0")), None, None), None, "unknown member: left as it is");
        assert_eq!(decide(Some(&v("3.6.0")), Some(&v("4.0.0")), None), None, "no change of major");
    }

    #[test]
    fn an_enabled_downgrade_lowers_the_version_one_minor_release_and_holds_it() {
        let t = v("3.5.0");
        assert_eq!(decide(Some(&v("3.6.0")), Some(&v("3.6.16")), Some(&t)), Some(v("3.5.0")));
        // Lowered: held there while members of both releases run (no rise back to 3.6).
        assert_eq!(decide(Some(&v("3.5.0")), Some(&v("3.5.36")), Some(&t)), None);
        assert_eq!(decide(Some(&v("3.5.0")), Some(&v("3.6.16")), Some(&t)), None);
        // Only one minor release down, from the cluster and from every member.
        assert_eq!(decide(Some(&v("3.6.0")), Some(&v("3.6.16")), Some(&v("3.4.0"))), None);
        assert_eq!(decide(Some(&v("3.6.0")), Some(&v("3.5.36")), Some(&v("3.5.0"))), None);
        assert_eq!(decide(Some(&v("3.6.0")), None, Some(&t)), None, "unknown member: left as it is");
        assert!(all_at(&[v("3.5.36"), v("3.5.21")], &t));
        assert!(!all_at(&[v("3.5.36"), v("3.7.3")], &t), "a Keel member (3.7) holds the downgrade open");
    }

    #[test]
    fn records_parse() {
        use crate::membership::parse_cluster_version as parse;
        assert_eq!(parse(Some(b"3.6.0")), Some(v("3.6.0")));
        assert_eq!(parse(Some(b"x")), None);
        assert_eq!(parse(None), None);
    }
}

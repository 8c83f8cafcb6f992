//! The HTTP handshake of etcd's raft streams: what the member opening a stream sends (it is
//! the receiver of the stream's messages) and how the member answering it decides, as etcd's
//! `rafthttp` does: version compatibility, cluster ID, the stream path and sender, removed
//! members, the addressee. Pure: headers in, an answer out. Owns no state; calls nothing.

use std::fmt;

/// The version Keel speaks to peers as (`X-Server-Version`): etcd's, whose behaviour it matches.
pub const SERVER_VERSION: &str = keel_config::ETCD_VERSION;
/// The oldest cluster version a member of this version joins (`X-Min-Cluster-Version`).
pub const MIN_CLUSTER_VERSION: &str = "3.0.0";

/// What a peer sends when it omits a version header (etcd 2.0 sent none).
const UNSTATED_VERSION: &str = "2.0.0";

/// A member ID as etcd prints it in paths and headers (`types.ID`: hex, no padding).
pub fn id_string(id: u64) -> String {
    format!("{id:x}")
}

/// The two raft streams, named by the path prefix a receiver opens them at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `/raft/stream/msgapp/<from>`: appends only, framed as msgappv2.
    MsgAppV2,
    /// `/raft/stream/message/<from>`: every other message.
    Message,
}

impl StreamKind {
    pub fn prefix(self) -> &'static str {
        match self {
            StreamKind::MsgAppV2 => "/raft/stream/msgapp",
            StreamKind::Message => "/raft/stream/message",
        }
    }

    /// The stream's name in etcd's logs.
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::MsgAppV2 => "stream MsgApp v2",
            StreamKind::Message => "stream Message",
        }
    }

    /// The path member `local` opens to receive this stream from another member.
    pub fn path(self, local: u64) -> String {
        format!("{}/{}", self.prefix(), id_string(local))
    }
}

/// Why a stream request is refused: etcd's HTTP status and body (`http.Error` ends it with a
/// newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: &'static str,
}

impl Refusal {
    const fn new(status: u16, body: &'static str) -> Refusal {
        Refusal { status, body }
    }
    pub const METHOD: Refusal = Refusal::new(405, "Method Not Allowed");
    pub const INCOMPATIBLE_VERSION: Refusal = Refusal::new(412, "incompatible version");
    pub const CLUSTER_ID_MISMATCH: Refusal = Refusal::new(412, "cluster ID mismatch");
    pub const INVALID_PATH: Refusal = Refusal::new(404, "invalid path");
    pub const INVALID_FROM: Refusal = Refusal::new(404, "invalid from");
    pub const REMOVED: Refusal = Refusal::new(410, "removed member");
    pub const UNKNOWN_SENDER: Refusal = Refusal::new(404, "error sender not found");
    pub const TO_MISMATCH: Refusal = Refusal::new(412, "to field mismatch");

    /// The response body as etcd writes it.
    pub fn text(&self) -> String {
        format!("{}\n", self.body)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

/// The headers member `local` of cluster `cluster` sends to open a stream from `peer`,
/// advertising its own peer URLs.
pub fn stream_request_headers(local: u64, cluster: u64, peer: u64, peer_urls: &[String]) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("X-Server-From", id_string(local)),
        ("X-Server-Version", SERVER_VERSION.to_string()),
        ("X-Min-Cluster-Version", MIN_CLUSTER_VERSION.to_string()),
        ("X-Etcd-Cluster-ID", id_string(cluster)),
        ("X-Raft-To", id_string(peer)),
    ];
    if !peer_urls.is_empty() {
        h.push(("X-PeerURLs", peer_urls.join(",")));
    }
    h
}

/// Major and minor of a version header (absent: etcd 2.0's); None if it is not a version.
fn major_minor(header: Option<&str>) -> Option<(u64, u64)> {
    let v = semver::Version::parse(header.unwrap_or(UNSTATED_VERSION).trim()).ok()?;
    Some((v.major, v.minor))
}

/// etcd's version rule between two members: the remote's version is at least this member's
/// minimum cluster version, and the remote's minimum cluster version at most this member's
/// version (major.minor only). A header that is not a version is incompatible.
pub fn versions_compatible(remote_server: Option<&str>, remote_min_cluster: Option<&str>) -> bool {
    let (Some(server), Some(min_cluster)) = (major_minor(remote_server), major_minor(remote_min_cluster)) else {
        return false;
    };
    let (Some(local_server), Some(local_min)) = (major_minor(Some(SERVER_VERSION)), major_minor(Some(MIN_CLUSTER_VERSION))) else {
        return false;
    };
    server >= local_min && min_cluster <= local_server
}

/// What the answering member knows of the stream's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A member of the cluster.
    Member,
    /// A member removed from the cluster.
    Removed,
    /// Not known (yet: this member may be behind).
    Unknown,
}

/// A stream request member `local` of cluster `cluster` accepted: which stream, opened by whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub kind: StreamKind,
    pub from: u64,
}

/// Decides a stream request as etcd's stream handler does, in its order. `header` reads a
/// request header; `sender` says what this member knows of a member ID. The answer to an
/// accepted request is 200 with `X-Server-Version` and `X-Etcd-Cluster-ID` (sent on refusals
/// too), then the stream.
pub fn accept_stream(
    local: u64,
    cluster: u64,
    method: &str,
    path: &str,
    header: impl Fn(&str) -> Option<String>,
    sender: impl Fn(u64) -> Sender,
) -> Result<Accepted, Refusal> {
    if method != "GET" {
        return Err(Refusal::METHOD);
    }
    if !versions_compatible(header("X-Server-Version").as_deref(), header("X-Min-Cluster-Version").as_deref()) {
        return Err(Refusal::INCOMPATIBLE_VERSION);
    }
    if header("X-Etcd-Cluster-ID").as_deref() != Some(id_string(cluster).as_str()) {
        return Err(Refusal::CLUSTER_ID_MISMATCH);
    }
    let (dir, base) = path.rsplit_once('/').ok_or(Refusal::INVALID_PATH)?;
    let kind = [StreamKind::MsgAppV2, StreamKind::Message].into_iter().find(|k| k.prefix() == dir).ok_or(Refusal::INVALID_PATH)?;
    let from = u64::from_str_radix(base, 16).map_err(|_| Refusal::INVALID_FROM)?;
    match sender(from) {
        Sender::Removed => return Err(Refusal::REMOVED),
        Sender::Unknown => return Err(Refusal::UNKNOWN_SENDER),
        Sender::Member => {}
    }
    if header("X-Raft-To").as_deref() != Some(id_string(local).as_str()) {
        return Err(Refusal::TO_MISMATCH);
    }
    Ok(Accepted { kind, from })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ask(method: &str, path: &str, headers: &[(&str, String)]) -> Result<Accepted, Refusal> {
        let h: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let sender = |id: u64| match id {
            0x2 | 0xabc => Sender::Member,
            0x9 => Sender::Removed,
            _ => Sender::Unknown,
        };
        accept_stream(0x1, 0xc1, method, path, |k| h.get(k).cloned(), sender)
    }

    #[test]
    fn a_member_opening_a_stream_is_accepted_with_etcds_headers() {
        // Member 0xabc opens member 1's streams to it: it asks for path .../<its own id>.
        let h = stream_request_headers(0xabc, 0xc1, 0x1, &["https://10.0.0.3:2380".into()]);
        let get = |k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("X-Server-From").as_deref(), Some("abc"));
        assert_eq!(get("X-Raft-To").as_deref(), Some("1"));
        assert_eq!(get("X-Etcd-Cluster-ID").as_deref(), Some("c1"));
        assert_eq!(get("X-PeerURLs").as_deref(), Some("https://10.0.0.3:2380"));
        assert_eq!(StreamKind::MsgAppV2.path(0xabc), "/raft/stream/msgapp/abc");
        let ok = ask("GET", &StreamKind::MsgAppV2.path(0xabc), &h).unwrap();
        assert_eq!(ok, Accepted { kind: StreamKind::MsgAppV2, from: 0xabc });
        let ok = ask("GET", &StreamKind::Message.path(0xabc), &h).unwrap();
        assert_eq!(ok.kind, StreamKind::Message);
    }

    #[test]
    fn refusals_come_in_etcds_order_with_its_status_and_text() {
        let good = stream_request_headers(0x2, 0xc1, 0x1, &[]);
        let with = |k: &'static str, v: &str| {
            let mut h: Vec<(&str, String)> = good.iter().filter(|(n, _)| *n != k).cloned().collect();
            h.push((k, v.to_string()));
            h
        };
        let path = StreamKind::Message.path(0x2);
        assert_eq!(ask("POST", &path, &good), Err(Refusal::METHOD));
        assert_eq!(ask("GET", &path, &with("X-Server-Version", "2.3.0")), Err(Refusal::INCOMPATIBLE_VERSION));
        assert_eq!(ask("GET", &path, &with("X-Min-Cluster-Version", "3.8.0")), Err(Refusal::INCOMPATIBLE_VERSION));
        assert_eq!(ask("GET", &path, &with("X-Server-Version", "garbage")), Err(Refusal::INCOMPATIBLE_VERSION));
        // A version check comes before the cluster ID check.
        let mut both = with("X-Server-Version", "2.3.0");
        both.retain(|(n, _)| *n != "X-Etcd-Cluster-ID");
        assert_eq!(ask("GET", &path, &both), Err(Refusal::INCOMPATIBLE_VERSION));
        assert_eq!(ask("GET", &path, &with("X-Etcd-Cluster-ID", "c2")), Err(Refusal::CLUSTER_ID_MISMATCH));
        assert_eq!(ask("GET", "/raft/stream/msgappv3/2", &good), Err(Refusal::INVALID_PATH));
        assert_eq!(ask("GET", "/raft/stream/message/xyz", &good), Err(Refusal::INVALID_FROM));
        assert_eq!(ask("GET", "/raft/stream/message/9", &good), Err(Refusal::REMOVED));
        assert_eq!(ask("GET", "/raft/stream/message/7", &good), Err(Refusal::UNKNOWN_SENDER));
        assert_eq!(ask("GET", &path, &with("X-Raft-To", "5")), Err(Refusal::TO_MISMATCH));
        assert_eq!(Refusal::CLUSTER_ID_MISMATCH.text(), "cluster ID mismatch\n");
    }

    #[test]
    fn versions_follow_etcds_major_minor_rule() {
        // etcd 3.5, 3.6 and 3.7 members and Keel (3.7) talk to each other.
        for v in ["3.5.21", "3.6.16", "3.7.3"] {
            assert!(versions_compatible(Some(v), Some("3.0.0")), "{v}");
        }
        // No version header: etcd 2.0, below the minimum cluster version 3.0.
        assert!(!versions_compatible(None, None));
        // A member that needs a cluster of 3.8 or later.
        assert!(!versions_compatible(Some("3.8.0"), Some("3.8.0")));
        assert!(versions_compatible(Some("3.7.99-alpha.0"), Some("3.7.0")));
    }
}

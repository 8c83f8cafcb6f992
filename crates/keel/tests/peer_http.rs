//! etcd's HTTP endpoints on the peer URL, against real etcd 3.6.16: the same member (same
//! name, URLs and cluster token, so the same member and cluster IDs) run first as etcd, then as
//! Keel on the same ports, must answer `/members`, a wrong method and an unknown path with the
//! same status, headers that matter and bytes; and a member joining an existing cluster reads
//! etcd's member list as it reads Keel's.
//!
//! Needs etcd 3.6.16 (`scripts/etcd-ref.sh`); skipped only when `KEEL_SKIP_ETCD_ORACLE=1`.

mod common;

use common::*;
use std::io::{Read, Write};

/// An answer: status code, the headers kept (lower-case names, sorted), body.
type Answer = (u16, Vec<(String, String)>, String);

/// One raw HTTP/1.0 exchange; of the headers, those named in `keep` (lower case).
fn exchange(addr: &str, method: &str, path: &str, keep: &[&str]) -> Answer {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .collect();
    headers.sort();
    (status, headers, body.to_string())
}

const KEEP: &[&str] = &["x-etcd-cluster-id", "content-type", "allow"];

fn answers(peer: &str) -> Vec<Answer> {
    vec![
        exchange(peer, "GET", "/members", KEEP),
        exchange(peer, "POST", "/members", KEEP),
        exchange(peer, "GET", "/members/promote/1", KEEP),
        exchange(peer, "GET", "/no-such-path", &["allow"]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_members_endpoint_answers_as_etcd_3_6_and_joining_reads_etcds() {
    let Some(e) = etcd("3.6") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (cport, pport) = (free_port(), free_port());
    let peer = format!("127.0.0.1:{pport}");

    let mut ep = start(&e.server, &tmp.path().join("etcd.etcd"), cport, pport, &[]);
    assert!(ep.wait_ready(), "etcd did not start: {}", ep.log_text());
    let want = answers(&peer);
    // What a joining Keel member reads from etcd's peer URL.
    let dialer = keel_server::peer::Dialer::new(None, None);
    let joined = keel_server::rafthttp::client::fetch_members(&dialer, &[format!("http://{peer}")]).await.expect("fetch etcd's members");
    ep.stop();

    let mut kp = start(&keel_bin(), &tmp.path().join("keel.etcd"), cport, pport, &[]);
    assert!(kp.wait_ready(), "keel did not start: {}", kp.log_text());
    let got = answers(&peer);
    let from_keel = keel_server::rafthttp::client::fetch_members(&dialer, &[format!("http://{peer}")]).await.expect("fetch Keel's members");
    kp.stop();

    assert_eq!(want[0].0, 200, "etcd's /members: {:?}", want[0]);
    assert!(want[0].2.contains("\"clientURLs\""), "etcd had published its client URLs: {:?}", want[0]);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w, g, "etcd 3.6.16 (left) and Keel (right) answer differently");
    }
    assert_eq!(joined, from_keel, "the member list a joining member reads");
    assert_eq!(joined.members.len(), 1);
    assert_eq!(joined.members[0].name, "t1");
    assert_eq!(format!("{:x}", joined.cluster_id), want[0].1.iter().find(|(k, _)| k == "x-etcd-cluster-id").unwrap().1);
}

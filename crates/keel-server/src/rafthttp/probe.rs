//! etcd's prober: `GET /raft/probing` on each peer every [`INTERVAL`], the round trip into
//! `etcd_network_peer_round_trip_time_seconds{To}` (unanswered probes are not counted), and the
//! answer this member gives (etcd's `probing` handler: `{"OK":true,"Now":...}`).
//!
//! Owns nothing; calls the HTTP client pool.

use crate::rafthttp::transport::{Link, Shared};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a peer is probed (etcd's: its 5 s connection read timeout less 1 s).
pub const INTERVAL: Duration = Duration::from_secs(4);
/// The path probed.
pub const PATH: &str = "/raft/probing";

/// Probes `link`'s peer while it is a member.
pub(crate) async fn run(shared: Arc<Shared>, link: Arc<Link>) {
    let link = Arc::downgrade(&link);
    loop {
        tokio::time::sleep(INTERVAL).await;
        let Some(link) = link.upgrade() else { return };
        let Some(url) = shared.peer_urls(link.id).into_iter().next() else { return };
        let t0 = Instant::now();
        if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(5), shared.pool.get(&url, PATH)).await {
            if a.status.is_success() {
                keel_metrics::METRICS.peer_round_trip.with_label_values(&[&link.label]).observe(t0.elapsed().as_secs_f64());
            }
        }
    }
}

/// The prober's answer: `{"OK":true,"Now":"<RFC 3339 time>"}` and a newline, as Go's JSON
/// encoder writes etcd's.
pub fn answer() -> String {
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    format!("{{\"OK\":true,\"Now\":\"{now}\"}}\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_answer_is_etcds_json() {
        let a = super::answer();
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["OK"], true);
        assert!(v["Now"].as_str().unwrap().ends_with('Z'), "{a}");
        assert!(a.ends_with("}\n"));
    }
}

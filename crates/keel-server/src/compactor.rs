//! Auto-compaction (`--auto-compaction-mode`, `--auto-compaction-retention`), run by the leader
//! only and proposed through raft like a client's Compact.
//!
//! - `periodic`: keep `retention` worth of history (a Go duration, or a bare number of hours).
//!   The current revision is sampled every tenth of the retention (at most every 6 minutes); each
//!   sample compacts to the newest revision older than the retention.
//! - `revision`: every 5 minutes, compact to `current - retention`.

use crate::server::Server;
use keel_proto::etcdserverpb::CompactionRequest;
use keel_proto::keelpb::internal_raft_request::Request;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Off,
    Periodic(Duration),
    Revision(i64),
}

/// Reads the two flags as etcd does.
pub fn policy(mode: &str, retention: &str) -> Result<Policy, String> {
    let retention = retention.trim();
    match mode {
        "periodic" | "" => {
            let invalid = || format!("invalid --auto-compaction-retention {retention:?}");
            let d = match retention.parse::<f64>() {
                // Hours; a value too large for a duration (or NaN) is refused, not a panic.
                Ok(h) if h >= 0.0 => Duration::try_from_secs_f64(h * 3600.0).map_err(|_| invalid())?,
                Ok(_) => return Err(invalid()),
                Err(_) => {
                    keel_config::parse_go_duration(retention).ok_or_else(|| format!("invalid --auto-compaction-retention {retention:?}"))?
                }
            };
            Ok(if d.is_zero() { Policy::Off } else { Policy::Periodic(d) })
        }
        "revision" => {
            let n: i64 = retention.parse().map_err(|_| format!("invalid --auto-compaction-retention {retention:?} for revision mode"))?;
            Ok(if n <= 0 { Policy::Off } else { Policy::Revision(n) })
        }
        other => Err(format!("unknown auto-compaction mode {other:?} (periodic or revision)")),
    }
}

/// The revision to compact to at `now`, from revision samples taken over time (oldest first):
/// the newest sample at least `retention` old. Drops samples no longer needed.
pub fn periodic_target(samples: &mut VecDeque<(Instant, i64)>, now: Instant, retention: Duration) -> Option<i64> {
    let mut target = None;
    while let Some(&(t, rev)) = samples.front() {
        if now.duration_since(t) >= retention {
            target = Some(rev);
            samples.pop_front();
        } else {
            break;
        }
    }
    if let Some(rev) = target {
        // Keep it as the oldest sample: the next target is never older.
        samples.push_front((now - retention, rev));
    }
    target
}

pub async fn run(s: Arc<Server>, policy: Policy) {
    let (interval, desc) = match policy {
        Policy::Off => return,
        Policy::Periodic(d) => ((d.min(Duration::from_secs(3600)) / 10).max(Duration::from_millis(100)), format!("periodic {d:?}")),
        Policy::Revision(n) => (Duration::from_secs(300), format!("revision {n}")),
    };
    tracing::info!(policy = %desc, interval = ?interval, "starting auto compaction");
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if s.raft().stopped() {
            return;
        }
        let (cur, compacted) = {
            let st = s.store();
            (st.current_rev(), st.compacted_rev())
        };
        let target = match policy {
            Policy::Off => return,
            Policy::Periodic(d) => {
                samples.push_back((Instant::now(), cur));
                periodic_target(&mut samples, Instant::now(), d)
            }
            Policy::Revision(n) => Some(cur - n),
        };
        let leader = s.raft().is_leader();
        let Some(rev) = target.filter(|r| *r > compacted && *r > 0 && leader) else { continue };
        match s.propose(Request::Compaction(CompactionRequest { revision: rev, physical: false })).await {
            Ok(_) => tracing::info!(revision = rev, policy = %desc, "completed auto compaction"),
            Err(e) => tracing::warn!(revision = rev, error = %e, "auto compaction failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_read_as_etcd() {
        assert_eq!(policy("periodic", "0"), Ok(Policy::Off));
        assert_eq!(policy("periodic", "1"), Ok(Policy::Periodic(Duration::from_secs(3600))));
        assert_eq!(policy("periodic", "30m"), Ok(Policy::Periodic(Duration::from_secs(1800))));
        assert!(policy("periodic", "1e300").is_err(), "too large for a duration: an error, not a panic");
        assert!(policy("periodic", "NaN").is_err());
        assert_eq!(policy("revision", "1000"), Ok(Policy::Revision(1000)));
        assert!(policy("revision", "1h").is_err());
        assert!(policy("sometimes", "1").is_err());
    }

    #[test]
    fn periodic_keeps_the_retention() {
        let t0 = Instant::now();
        let r = Duration::from_secs(60);
        let mut s = VecDeque::new();
        for i in 0..6 {
            s.push_back((t0 + Duration::from_secs(10 * i), 100 + i as i64));
        }
        assert_eq!(periodic_target(&mut s, t0 + Duration::from_secs(50), r), None);
        // At 75 s the samples of 0 s and 10 s are old enough; the newer one wins.
        assert_eq!(periodic_target(&mut s, t0 + Duration::from_secs(75), r), Some(101));
        assert_eq!(periodic_target(&mut s, t0 + Duration::from_secs(76), r), Some(101));
        assert_eq!(periodic_target(&mut s, t0 + Duration::from_secs(120), r), Some(105));
    }
}

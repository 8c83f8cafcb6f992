//! Paces a background walk's reads from the disk (a finished compaction's hash of a backend
//! that is not in the page cache).
//!
//! The members' WALs share the disk with the walk, and every write waits for their fdatasyncs.
//! Reading a cold file 4 KiB at a time as fast as the disk serves it took a WAL-like probe's
//! fdatasync p99 from 0.3 to 16 ms (max 25 ms); paced at 50 MiB/s, 3.7 ms; at 20 MiB/s, 1.3 ms
//! (`keel-wal`'s `examples/fsync_contention.rs`, `read` mode). Only what the thread really read
//! from the disk counts (`/proc/thread-self/io`'s `read_bytes`): pages found in the page cache
//! cost the disk nothing and are not paced.
//!
//! Owns nothing shared; calls only std (the thread's I/O accounting and sleep).

use std::time::{Duration, Instant};

/// The disk reads a paced thread may do per second.
pub(crate) const BACKGROUND_READ_BYTES_PER_SEC: u64 = 48 << 20;

/// Keeps one thread's disk reads at most `rate` bytes a second on average since it was made.
pub(crate) struct ReadPace {
    rate: u64,
    started: Instant,
    /// The thread's `read_bytes` when the pace was made; `None` where it cannot be read (no
    /// pacing then).
    base: Option<u64>,
}

impl ReadPace {
    /// A pace for the calling thread; [`ReadPace::wait`] must be called on that thread.
    pub(crate) fn new(rate: u64) -> ReadPace {
        ReadPace { rate, started: Instant::now(), base: thread_read_bytes() }
    }

    /// Sleeps as long as the thread's disk reads since [`ReadPace::new`] are ahead of the pace.
    pub(crate) fn wait(&self) {
        let (Some(base), Some(now)) = (self.base, thread_read_bytes()) else { return };
        let ahead = ahead_by(now.saturating_sub(base), self.rate, self.started.elapsed());
        if !ahead.is_zero() {
            std::thread::sleep(ahead);
        }
    }
}

/// How far `read` bytes in `elapsed` are ahead of `rate` bytes a second (zero when behind).
fn ahead_by(read: u64, rate: u64, elapsed: Duration) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(read as f64 / rate as f64).saturating_sub(elapsed)
}

/// Bytes this thread has caused to be read from storage (not from the page cache).
fn thread_read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("read_bytes:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ahead_of_the_pace_wait_for_it() {
        let mib = 1 << 20;
        // 96 MiB at 48 MiB/s is due at 2 s: 0.5 s in, 1.5 s ahead.
        assert_eq!(ahead_by(96 * mib, 48 * mib, Duration::from_millis(500)), Duration::from_millis(1500));
        assert_eq!(ahead_by(96 * mib, 48 * mib, Duration::from_secs(3)), Duration::ZERO);
        assert_eq!(ahead_by(0, 48 * mib, Duration::ZERO), Duration::ZERO);
        assert_eq!(ahead_by(96 * mib, 0, Duration::ZERO), Duration::ZERO, "no rate: no pace");
    }

    #[test]
    fn the_thread_read_count_is_available_here() {
        // Linux with task I/O accounting (every kernel Keel is run on); pacing is off without.
        assert!(thread_read_bytes().is_some());
    }
}

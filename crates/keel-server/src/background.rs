//! Whole-backend work in the background, at a lower CPU priority: a snapshot written for a
//! peer or a client, a defragmentation's copy, the hash a compaction takes of the key space
//! (every value read: at 5 GB, 65 s of all three members' CPU, and a writer's p99 went from 5
//! to 40 ms meanwhile). Each runs on a thread of its own at nice +10
//! (Linux: per thread), so that on a busy machine it takes the CPU the request path leaves
//! instead of competing with raft, the apply stage and the handlers (a 1 GB copy at normal
//! priority made the leader's write p99 30 times its own on two cores).
//!
//! Owns nothing; calls the OS (`setpriority`) and tokio's oneshot channel.

/// The nice value of a background copy's thread.
pub const NICE: i32 = 10;

/// Runs `f` on a new thread named `name` at nice [`NICE`], and waits for its result.
pub async fn run<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn(name, move || {
        let _ = tx.send(f());
    })?;
    rx.await.map_err(|_| format!("the {name} thread ended without a result"))
}

/// Starts `f` on a new thread named `name` at nice [`NICE`], without waiting for it.
pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_priority();
            f();
        })
        .map(drop)
        .map_err(|e| format!("cannot start the {name} thread: {e}"))
}

/// Lowers the calling thread's CPU priority (best effort: where it fails, the work runs at the
/// priority it has).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid, getpriority and setpriority take and return plain integers; nothing
        // is borrowed.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // Never above the process's own niceness (an operator's `nice -n 19 keel` stays 19).
        let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        if now >= NICE {
            return;
        }
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE) };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a background thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    /// The calling thread's nice value, and whether it is another thread than `caller`.
    fn seen_from(caller: std::thread::ThreadId) -> (bool, i32) {
        // SAFETY: as in lower_priority.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        (std::thread::current().id() != caller, nice)
    }

    /// The work runs on its own thread, at nice +10, and its result comes back.
    #[tokio::test]
    async fn runs_niced_on_its_own_thread() {
        let caller = std::thread::current().id();
        let (other, nice) = super::run("test-copy", move || seen_from(caller)).await.unwrap();
        assert!(other);
        assert!(nice >= super::NICE, "nice {nice}");
    }

    /// Work started without waiting runs niced on its own thread too.
    #[test]
    fn spawned_work_runs_niced_on_its_own_thread() {
        let caller = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        super::spawn("test-hash", move || {
            let _ = tx.send(seen_from(caller));
        })
        .unwrap();
        let (other, nice) = rx.recv().unwrap();
        assert!(other);
        assert!(nice >= super::NICE, "nice {nice}");
    }
}

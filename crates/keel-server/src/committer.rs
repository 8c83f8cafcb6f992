//! The backend committer: a thread of its own that commits the store's pending batch when it
//! is due (etcd's batch interval and limit, `keel_mvcc::store::BATCH_INTERVAL` and
//! `BATCH_LIMIT`), so that the apply stage never waits for a backend commit; at most one batch
//! per `keel_mvcc::store::SYNC_INTERVAL` (or at once when one is wanted) is made durable, the
//! others only visible (`keel_mvcc::backend::CommitMode`). A commit does not
//! hold the store's lock while it writes (`keel_mvcc::SharedStore::commit`), so applies and
//! reads go on beside it; on the apply thread, every write applied behind a big commit (a
//! compaction's deletions: ~100 ms each at 1 GB) waited for it.
//!
//! Owns its thread and the channel that wakes it; calls only `keel_mvcc::SharedStore`. Whoever
//! needs a batch durable at a point (the final sync, a wished-for snapshot) still commits
//! itself: commits take turns on the store's commit lock. A compaction's end asks for the next
//! batch to be durable (`keel_mvcc::Store::want_sync`). A raft snapshot every
//! `--snapshot-count` entries does not: it waits for this thread's commits to reach its index
//! (`keel_raft::StateMachine::durable_index`).

use keel_mvcc::SharedStore;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;

/// The background committer of one store; stopping it (drop) waits for a commit in progress.
pub struct Committer {
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Starts the committer of `store`.
    pub fn start(store: Arc<SharedStore>) -> std::io::Result<Committer> {
        // One nudge waiting is enough: the thread looks at the whole batch when it wakes.
        let (wake, woken) = sync_channel::<()>(1);
        let thread = std::thread::Builder::new().name("backend-commit".into()).spawn(move || loop {
            match woken.recv_timeout(keel_mvcc::store::BATCH_INTERVAL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Err(e) = store.commit_if_due() {
                tracing::error!(error = %e, "backend commit failed; stopping");
                std::process::exit(1);
            }
        })?;
        Ok(Committer { wake: Some(wake), thread: Some(thread) })
    }

    /// Wakes the committer to look at the batch now (it commits only when the batch is due).
    /// Never blocks.
    pub fn nudge(&self) {
        if let Some(w) = &self.wake {
            match w.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

//! Removing large files without stalling other files' fsyncs.
//!
//! Freeing a file's blocks is one journal transaction on ext4, and on a file system mounted with
//! `discard` the whole range is discarded when it commits: removing a 2 GB file held every fsync
//! on the disk (the WAL's among them) for ~280 ms on the machine of PERFORMANCE.md, and a 64 MB
//! WAL segment for ~65 ms. So a file removed here is unlinked at once (its name is gone when the
//! call returns, as with `std::fs::remove_file`) and its blocks are given back [`STEP`] bytes at a
//! time, each step truncated and synced on its own, by one background thread (the same 2 GB
//! file: no fsync held more than ~11 ms, 2.4 s in all), resting after each step as long as it
//! took (so freeing takes at most half the disk's time). A process that exits first leaves the
//! rest to the kernel, which frees an unlinked file when its last descriptor closes.
//!
//! Only files without a name are ever truncated: [`release`] checks the link count, so a file
//! handed over while it still has a name (a rename that did not happen) is only closed. And no
//! step reaches the disk before the removal does: [`remove`]'s directory is synced before the
//! first step (a power cut must not bring back a name whose file was cut short), and a file
//! given to [`release`] lost its name by a rename its caller synced.
//!
//! Owns the reclaim thread and its queue. Calls std's file system functions and `tracing`.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;

/// Bytes given back per step. Each step's free (and discard) is what another fsync may wait for:
/// 4 MiB held none longer than ~11 ms here; 16 MiB held them up to ~34 ms.
pub const STEP: u64 = 4 << 20;

/// Files waiting for the reclaim thread: a few at most in practice (a defragmentation's old file,
/// a released WAL segment or two); a full queue frees in the caller's thread instead.
const QUEUE: usize = 64;

/// Unlinks `path` now and gives its blocks back in steps, later.
pub fn remove(path: &Path) -> io::Result<()> {
    // Opened for writing to be truncated; a file that cannot be (read-only) is removed as usual.
    let file = std::fs::OpenOptions::new().write(true).open(path);
    std::fs::remove_file(path)?;
    if let Ok(f) = file {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        hand_over(f, Some(dir.to_path_buf()));
    }
    Ok(())
}

/// Gives the blocks of `file`, once it has no name left, back in steps, later; a file that
/// still has a name is only closed.
pub fn release(file: File) {
    hand_over(file, None);
}

fn hand_over(file: File, dir: Option<PathBuf>) {
    match queue().try_send(Job::Free(file, dir)) {
        Ok(()) => {}
        Err(TrySendError::Full(Job::Free(f, d))) | Err(TrySendError::Disconnected(Job::Free(f, d))) => free(f, d.as_deref()),
        Err(_) => {}
    }
}

/// Returns once every file handed over before the call has been dealt with (tests wait on it).
pub fn wait_idle() {
    let (tx, rx) = sync_channel(1);
    if queue().send(Job::Mark(tx)).is_ok() {
        let _ = rx.recv();
    }
}

/// What the reclaim thread is given.
enum Job {
    /// A file to free, and the directory to sync first (its name's removal made durable).
    Free(File, Option<PathBuf>),
    /// Answered once every job before it is done.
    Mark(SyncSender<()>),
}

fn queue() -> &'static SyncSender<Job> {
    static QUEUE_TX: OnceLock<SyncSender<Job>> = OnceLock::new();
    QUEUE_TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let spawned = std::thread::Builder::new().name("reclaim".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                match job {
                    Job::Free(f, dir) => free(f, dir.as_deref()),
                    Job::Mark(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the thread that frees removed files; they are freed where removed");
        }
        // With no thread the receiver is gone and every send fails: the caller frees.
        tx
    })
}

/// Truncates `file` to nothing in [`STEP`]s, syncing each, if it has no name; then closes it.
/// `dir`, where its name was, is synced first; if it cannot be, the file is only closed.
fn free(file: File, dir: Option<&Path>) {
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(_) => return,
    };
    if meta.nlink() > 0 {
        return;
    }
    if let Some(d) = dir {
        if let Err(e) = File::open(d).and_then(|d| d.sync_all()) {
            tracing::debug!(dir = %d.display(), error = %e, "cannot sync a removed file's directory; the file is freed when it closes");
            return;
        }
    }
    let mut size = meta.len();
    while size > 0 {
        let began = std::time::Instant::now();
        size = size.saturating_sub(STEP);
        if let Err(e) = file.set_len(size).and_then(|()| file.sync_all()) {
            // The kernel frees what is left when the file closes.
            tracing::debug!(error = %e, "cannot free a removed file in steps");
            return;
        }
        if size > 0 {
            std::thread::sleep(rest_after(began.elapsed()));
        }
    }
}

/// The pause after a step that took `took`: as long as the step, and at least [`MIN_REST`], so
/// the disk spends at most half its time freeing, less when a step is slow. Back to back, the
/// steps of an 11-14 GB file (3,212 in 9 s) once made a truncate take 102 ms, and the writes on
/// the disk (the WALs' appends) waited for it.
fn rest_after(took: std::time::Duration) -> std::time::Duration {
    took.max(MIN_REST)
}

/// The shortest pause between two steps.
const MIN_REST: std::time::Duration = std::time::Duration::from_millis(1);

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(dir: &Path, name: &str, bytes: u64) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; bytes as usize]).unwrap();
        f.sync_all().unwrap();
        p
    }

    /// A removed file's name is gone at once, and its blocks go in steps: a descriptor kept on
    /// it sees it shrink to nothing.
    #[test]
    fn a_removed_file_is_unlinked_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_of(dir.path(), "big", 3 * STEP + 5);
        let watcher = File::open(&p).unwrap();
        remove(&p).unwrap();
        assert!(!p.exists());
        wait_idle();
        assert_eq!(watcher.metadata().unwrap().len(), 0);
        assert_eq!(watcher.metadata().unwrap().nlink(), 0);
    }

    /// A file that still has a name is never truncated, only closed.
    #[test]
    fn a_file_with_a_name_is_left_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_of(dir.path(), "kept", STEP + 1);
        free(std::fs::OpenOptions::new().write(true).open(&p).unwrap(), Some(dir.path()));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), STEP + 1);
    }

    /// An unlinked file handed over directly is emptied too.
    #[test]
    fn a_released_unlinked_file_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_of(dir.path(), "gone", 2 * STEP);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let watcher = File::open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        free(f, None);
        assert_eq!(watcher.metadata().unwrap().len(), 0);
    }

    /// Removing a file that is not there fails as `remove_file` does.
    #[test]
    fn removing_a_missing_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(remove(&dir.path().join("none")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// The thread rests after each step as long as the step took, never less than the floor.
    #[test]
    fn the_rest_after_a_step_matches_its_length() {
        use std::time::Duration;
        assert_eq!(rest_after(Duration::ZERO), MIN_REST);
        assert_eq!(rest_after(Duration::from_micros(300)), MIN_REST);
        assert_eq!(rest_after(Duration::from_millis(40)), Duration::from_millis(40));
    }
}

//! Giving freed memory back to the OS. mimalloc (the binary's allocator) returns the pages a
//! thread frees only after a delay, and only when that thread next allocates or frees: a thread
//! that goes idle after a burst (a load of 16 KiB values through tokio's workers, a start's
//! recovery on the main thread) keeps its freed pages resident for good.
//!
//! Owns a per-thread time of the last collection. Calls mimalloc (`libmimalloc-sys`); with
//! another allocator (the tests) a collection finds nothing to release.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Least time between two collections of one thread's idle moments: a busy worker parks
/// thousands of times a second, and a collection walks the thread's pages.
const IDLE_EVERY: Duration = Duration::from_secs(1);

/// Hands every page freed so far on this thread back to the OS now.
pub fn release_freed() {
    // SAFETY: mi_collect takes no pointers; forcing it only walks mimalloc's own free lists.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// For a thread going idle (tokio's `on_thread_park`): hands back the pages this thread freed
/// whose delay has passed, at most once per [`IDLE_EVERY`].
pub fn release_when_idle() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST.with(|l| {
        let due = l.get().is_none_or(|t| now.duration_since(t) >= IDLE_EVERY);
        if due {
            l.set(Some(now));
        }
        due
    });
    if due {
        // SAFETY: as in `release_freed`; not forced, it purges only what mimalloc's delay allows.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

//! How the raft thread sleeps and is woken. It waits in a `mio::Poll` that watches two kinds of
//! source: its inbox (proposals, reads, peer messages from other threads), which a sender rings
//! with [`Bell::ring`] — one eventfd write, and only when the thread is asleep — and the
//! connections its transport reads on this thread ([`crate::Transport::attach`]), whose bytes
//! then reach raft with no other thread woken.
//!
//! Owns the poll and the bell; calls nothing.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

/// The poll token of the inbox's bell; the transport's sources use the tokens below it.
pub const BELL: mio::Token = mio::Token(usize::MAX);

/// Wakes the raft thread when something was put in its inbox while it slept.
pub(crate) struct Bell {
    sleeping: AtomicBool,
    waker: mio::Waker,
}

impl Bell {
    /// Called after putting a message in the inbox.
    pub(crate) fn ring(&self) {
        // Pairs with the fence in `Sleeper::next`: either the thread sees the message before it
        // sleeps, or this sees it asleep.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }
}

impl Bell {
    /// Wakes the thread even if it is not asleep yet (its next sleep returns at once).
    pub(crate) fn ring_always(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// The raft thread's side: its poll and the inbox's receiving end.
pub(crate) struct Sleeper<M> {
    poll: mio::Poll,
    events: mio::Events,
    bell: std::sync::Arc<Bell>,
    rx: Receiver<M>,
}

/// The inbox's senders are all gone.
pub(crate) struct Closed;

impl<M> Sleeper<M> {
    pub(crate) fn new(rx: Receiver<M>) -> std::io::Result<(Sleeper<M>, std::sync::Arc<Bell>)> {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), BELL)?;
        let bell = std::sync::Arc::new(Bell { sleeping: AtomicBool::new(false), waker });
        Ok((Sleeper { poll, events: mio::Events::with_capacity(64), bell: bell.clone(), rx }, bell))
    }

    pub(crate) fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }

    /// The next message of the inbox, waiting up to `wait` for one; the transport's sources that
    /// became ready meanwhile are added to `ready`. The sources are looked at every time, so that
    /// a busy inbox does not starve them.
    pub(crate) fn next(&mut self, wait: Duration, ready: &mut Vec<mio::Token>) -> Result<Option<M>, Closed> {
        match self.rx.try_recv() {
            Ok(m) => {
                self.poll_sources(Some(Duration::ZERO), ready);
                return Ok(Some(m));
            }
            Err(TryRecvError::Disconnected) => return Err(Closed),
            Err(TryRecvError::Empty) => {}
        }
        self.bell.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        match self.rx.try_recv() {
            Ok(m) => {
                self.bell.sleeping.store(false, Ordering::SeqCst);
                self.poll_sources(Some(Duration::ZERO), ready);
                return Ok(Some(m));
            }
            Err(TryRecvError::Disconnected) => return Err(Closed),
            Err(TryRecvError::Empty) => {}
        }
        self.poll_sources(Some(wait), ready);
        self.bell.sleeping.store(false, Ordering::SeqCst);
        match self.rx.try_recv() {
            Ok(m) => Ok(Some(m)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Closed),
        }
    }

    /// The next message already in the inbox, if any.
    pub(crate) fn try_next(&mut self) -> Option<M> {
        self.rx.try_recv().ok()
    }

    fn poll_sources(&mut self, wait: Option<Duration>, ready: &mut Vec<mio::Token>) {
        if let Err(e) = self.poll.poll(&mut self.events, wait) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "raft: poll failed");
            }
            return;
        }
        ready.extend(self.events.iter().map(|e| e.token()).filter(|t| *t != BELL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_sent_to_a_sleeping_thread_wakes_it_and_none_is_lost() {
        let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(1024);
        let (mut s, bell) = Sleeper::new(rx).unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..20_000u64 {
                tx.send(i).unwrap();
                bell.ring();
            }
        });
        let mut ready = Vec::new();
        let mut next = 0;
        // A lost wake-up would leave a message unseen for the whole (long) wait.
        let start = std::time::Instant::now();
        loop {
            match s.next(Duration::from_secs(30), &mut ready) {
                Ok(Some(m)) => {
                    assert_eq!(m, next);
                    next += 1;
                }
                Ok(None) => {}
                Err(Closed) => break,
            }
        }
        assert_eq!(next, 20_000);
        assert!(start.elapsed() < Duration::from_secs(30), "a wake-up was lost");
        sender.join().unwrap();
    }
}

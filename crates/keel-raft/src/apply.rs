//! The apply stage: a thread of its own that owns the [`StateMachine`] and applies committed
//! entries in log order, apart from the raft thread.
//!
//! Owns the state machine, the applied index (published in [`NodeStatus`]), the reads waiting
//! for the apply to reach their index, and the decision to take a local snapshot. The raft
//! thread hands it [`Task`]s through a bounded queue (what a full queue cannot take waits in the
//! [`Stage`]'s backlog on the raft side, so the raft thread goes on ticking) and waits for it
//! only to install a snapshot from the leader. It tells the raft
//! thread about the snapshots it took through an unbounded channel of [`Event`]s, which the raft
//! thread drains on every turn of its loop. It never touches raft itself.
//!
//! Calls the state machine and [`LogStore`] (to record what a snapshot for a follower is made of).

use crate::hops::{self, Hop};
use crate::machine::{ProposeError, StateMachine};
use crate::status::NodeStatus;
use crate::storage::LogStore;
use raft::eraftpb::{ConfState, Entry, EntryType, Snapshot};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A read waiting for the apply stage: answered with the index once it is applied.
pub type ReadSender = oneshot::Sender<Result<u64, ProposeError>>;

/// One committed entry, with the configuration raft moved to if it is a configuration change
/// raft accepted (the raft thread applies those to raft when it hands them over).
pub struct Committed {
    pub entry: Entry,
    pub conf: Option<ConfState>,
    /// When the raft thread handed it over.
    pub handed: Instant,
}

/// Work for the apply stage, done in the order it was queued.
pub enum Task {
    /// Committed entries, in log order.
    Entries(Vec<Committed>),
    /// Reads confirmed at `index` (ReadIndex): answered once everything up to it is applied.
    Reads { index: u64, senders: Vec<ReadSender>, confirmed: Instant },
    /// Replace the whole state by a snapshot from the leader (after every entry queued before
    /// it); the result goes to `done`.
    Restore { snap: Box<Snapshot>, backend: Option<std::path::PathBuf>, done: SyncSender<Result<(), String>> },
    /// Make everything applied durable, fail the waiting reads, and end.
    Stop,
}

/// What the apply stage tells the raft thread.
pub enum Event {
    /// A snapshot of the state machine at an applied index, durable in the state machine: save
    /// it and let the log before it go.
    Snapshot(Box<Snapshot>),
}

/// Settings of the apply stage.
#[derive(Debug, Clone, Copy)]
pub struct ApplyConfig {
    /// Take a snapshot every this many applied entries (`--snapshot-count`).
    pub snapshot_count: u64,
    /// How often the state machine is maintained when no work arrives (the raft tick).
    pub idle: Duration,
    /// Tasks queued at most ([`QUEUE`]); the raft thread waits when the queue is full.
    pub queue: usize,
}

/// Tasks queued at most; the raft thread waits when the queue is full.
pub const QUEUE: usize = 1024;

/// Bytes of tasks the raft thread holds for the stage beyond its queue before it waits for the
/// stage (the entries are in raft's log in memory as well; this bounds the second copy).
pub const BACKLOG_BYTES: usize = 64 << 20;

/// The apply stage's handle, held by the raft thread.
///
/// The raft thread never waits for a slow apply while it can hold the work: what the stage's
/// bounded queue cannot take goes to a backlog, in order, handed on by [`Stage::pump`] on every
/// pass of the raft loop, so ticks, heartbeats and votes go on. Only a backlog past
/// [`BACKLOG_BYTES`] makes the raft thread wait (memory stays bounded).
pub struct Stage {
    tx: SyncSender<Task>,
    events: Receiver<Event>,
    join: Option<std::thread::JoinHandle<()>>,
    backlog: std::collections::VecDeque<(Task, usize)>,
    backlog_bytes: usize,
}

/// What a task holds in memory, roughly.
fn task_bytes(t: &Task) -> usize {
    match t {
        Task::Entries(es) => es.iter().map(|c| c.entry.data.len() + c.entry.context.len() + 64).sum(),
        _ => 64,
    }
}

impl Stage {
    /// Starts the stage on its own thread. `applied`/`applied_term` are where the state machine
    /// stands (its durable state, or the snapshot raft starts from); `conf` the configuration
    /// then; `snap_index` the index of the newest local snapshot.
    pub fn start<S: StateMachine>(
        sm: S,
        cfg: ApplyConfig,
        status: Arc<NodeStatus>,
        log: LogStore,
        at: (u64, u64, ConfState),
        snap_index: u64,
    ) -> Result<Stage, String> {
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let (etx, events) = mpsc::channel();
        let (applied, applied_term, conf) = at;
        let worker =
            Worker { sm, cfg, status, log, applied, applied_term, conf, snap_index, undurable: None, reads: Vec::new(), events: etx };
        let join = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| format!("apply: cannot start thread: {e}"))?;
        Ok(Stage { tx, events, join: Some(join), backlog: Default::default(), backlog_bytes: 0 })
    }

    /// Queues a task; waits while the queue is full. False once the stage has ended.
    pub fn send(&mut self, t: Task) -> bool {
        self.flush() && self.tx.send(t).is_ok()
    }

    /// Queues a task without waiting: behind the backlog, or in it when the queue is full
    /// (waiting only once the backlog is past [`BACKLOG_BYTES`]). False once the stage ended.
    pub fn queue(&mut self, t: Task) -> bool {
        if !self.pump() {
            return false;
        }
        if self.backlog.is_empty() {
            match self.tx.try_send(t) {
                Ok(()) => return true,
                Err(mpsc::TrySendError::Disconnected(_)) => return false,
                Err(mpsc::TrySendError::Full(t)) => self.hold(t),
            }
        } else {
            self.hold(t);
        }
        if self.backlog_bytes > BACKLOG_BYTES {
            return self.flush();
        }
        true
    }

    fn hold(&mut self, t: Task) {
        let n = task_bytes(&t);
        self.backlog_bytes += n;
        self.backlog.push_back((t, n));
    }

    /// Hands the stage as much of the backlog as its queue takes now. False once it ended.
    pub fn pump(&mut self) -> bool {
        while let Some((t, n)) = self.backlog.pop_front() {
            match self.tx.try_send(t) {
                Ok(()) => self.backlog_bytes -= n,
                Err(mpsc::TrySendError::Full(t)) => {
                    self.backlog.push_front((t, n));
                    return true;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => return false,
            }
        }
        true
    }

    /// True while tasks wait in the backlog.
    pub fn backlogged(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Hands the whole backlog over, waiting for room. False once the stage ended.
    fn flush(&mut self) -> bool {
        while let Some((t, n)) = self.backlog.pop_front() {
            if self.tx.send(t).is_err() {
                return false;
            }
            self.backlog_bytes -= n;
        }
        true
    }

    /// Queues a task unless the queue is full.
    pub fn try_send(&self, t: Task) -> Result<(), mpsc::TrySendError<Task>> {
        self.tx.try_send(t)
    }

    /// Events since the last call.
    pub fn events(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// Installs a leader's snapshot once everything queued before it is applied; waits.
    pub fn restore(&mut self, snap: Snapshot, backend: Option<std::path::PathBuf>) -> Result<(), String> {
        let (done, rx) = mpsc::sync_channel(1);
        if !self.send(Task::Restore { snap: Box::new(snap), backend, done }) {
            return Err("the apply stage has stopped".into());
        }
        rx.recv().map_err(|_| "the apply stage stopped while installing a snapshot".to_string())?
    }

    /// Applies what is queued, makes it durable and ends the stage; waits for it.
    pub fn stop(&mut self) {
        let _ = self.flush();
        let _ = self.tx.send(Task::Stop);
        if let Some(j) = self.join.take() {
            if j.join().is_err() {
                tracing::error!("apply: the apply thread panicked");
            }
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker<S: StateMachine> {
    sm: S,
    cfg: ApplyConfig,
    status: Arc<NodeStatus>,
    log: LogStore,
    applied: u64,
    applied_term: u64,
    /// The configuration as of `applied`.
    conf: ConfState,
    snap_index: u64,
    /// A snapshot taken at `snap_index` that waits for the state machine to make it durable
    /// ([`StateMachine::durable_index`]) before it goes to the raft thread.
    undurable: Option<Snapshot>,
    reads: Vec<(u64, Vec<ReadSender>, Instant)>,
    events: Sender<Event>,
}

impl<S: StateMachine> Worker<S> {
    fn run(mut self, rx: Receiver<Task>) {
        let mut last_maintain = Instant::now();
        loop {
            let due = self.sm.maintain_in();
            let first = match rx.recv_timeout(due.map_or(self.cfg.idle, |d| d.min(self.cfg.idle))) {
                Ok(t) => Some(t),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(Task::Stop),
            };
            let mut stop = false;
            let mut tasks: Vec<Task> = first.into_iter().collect();
            tasks.extend(rx.try_iter().take(256));
            let before = self.applied;
            for t in tasks {
                match t {
                    Task::Entries(es) => self.apply(es),
                    Task::Reads { index, senders, confirmed } => self.reads.push((index, senders, confirmed)),
                    Task::Restore { snap, backend, done } => {
                        let r = self.restore(*snap, backend);
                        let _ = done.send(r);
                    }
                    Task::Stop => {
                        stop = true;
                        break;
                    }
                }
            }
            if self.applied != before {
                self.publish();
            }
            self.release_reads();
            let wanted = self.sm.maintain_in().is_some_and(|d| d.is_zero());
            if self.applied != before || wanted || last_maintain.elapsed() >= self.cfg.idle {
                self.sm.maintain();
                last_maintain = Instant::now();
            }
            self.maybe_snapshot();
            if stop {
                break;
            }
        }
        match self.sm.sync() {
            // A snapshot waiting for the background commit is durable now: it goes to the raft
            // thread, which saves it as it stops (as a snapshot taken at its index would be).
            Ok(()) => {
                if let Some(snap) = self.undurable.take() {
                    self.send_when_durable(snap);
                }
            }
            Err(e) => tracing::error!(error = %e, "apply: final sync of the state machine failed"),
        }
        for (_, senders, _) in self.reads.drain(..) {
            for s in senders {
                let _ = s.send(Err(ProposeError::Stopped));
            }
        }
        self.sm.on_stop();
    }

    fn apply(&mut self, entries: Vec<Committed>) {
        if let Some(first) = entries.first() {
            hops::observe(Hop::ApplyQueue, first.handed.elapsed());
        }
        for Committed { entry, conf, .. } in entries {
            if entry.index <= self.applied {
                // Delivered again (raft restarted from an older snapshot than the state
                // machine); the state machine has it.
                continue;
            }
            assert_eq!(entry.index, self.applied + 1, "apply: entries must arrive in order without gaps");
            let t = Instant::now();
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.sm.apply(&entry),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => match conf {
                    Some(cs) => {
                        self.sm.apply_conf_change(&entry, &cs);
                        self.conf = cs;
                    }
                    None => self.sm.skip_conf_change(&entry),
                },
            }
            hops::observe(Hop::Apply, t.elapsed());
            self.applied = entry.index;
            self.applied_term = entry.term;
        }
    }

    /// Publishes the applied index (status) and what a follower's snapshot is made of.
    fn publish(&mut self) {
        self.status.applied.store(self.applied, Ordering::Release);
        let data = self.sm.snapshot_data();
        let mut core = self.log.wl();
        core.applied_index = self.applied;
        core.applied_term = self.applied_term;
        core.applied_conf_state = self.conf.clone();
        core.app_data = data;
    }

    fn release_reads(&mut self) {
        let applied = self.applied;
        let mut i = 0;
        while i < self.reads.len() {
            if self.reads[i].0 <= applied {
                let (idx, senders, confirmed) = self.reads.swap_remove(i);
                hops::observe(Hop::ReadApply, confirmed.elapsed());
                for s in senders {
                    let _ = s.send(Ok(idx));
                }
            } else {
                i += 1;
            }
        }
    }

    fn restore(&mut self, snap: Snapshot, backend: Option<std::path::PathBuf>) -> Result<(), String> {
        self.sm.restore(&snap, backend)?;
        let m = snap.get_metadata();
        self.applied = m.index;
        self.applied_term = m.term;
        self.conf = m.get_conf_state().clone();
        self.snap_index = m.index;
        // A local snapshot still waiting is older than the leader's.
        self.undurable = None;
        self.publish();
        Ok(())
    }

    /// Takes a snapshot every `snapshot_count` entries (or when the state machine wishes one).
    /// It goes to the raft thread once the state machine holds it durably: at once after a
    /// [`StateMachine::sync`], or, for a state machine that commits in the background, once its
    /// [`StateMachine::durable_index`] reaches it (looked at again on every turn of the loop,
    /// the applies going on meanwhile).
    fn maybe_snapshot(&mut self) {
        if let Some(snap) = self.undurable.take() {
            self.send_when_durable(snap);
            return;
        }
        let forced = self.sm.take_snapshot_wish() && self.applied > self.snap_index;
        if !forced && self.applied <= self.snap_index + self.cfg.snapshot_count {
            return;
        }
        let background = self.sm.durable_index().is_some();
        // A wished-for snapshot is made durable now: it must be saved before the next entry.
        if forced || !background {
            if let Err(e) = self.sm.sync() {
                tracing::error!(error = %e, "apply: cannot sync the state machine; snapshot postponed");
                return;
            }
        }
        let snap = crate::storage::snapshot_at(self.applied, self.applied_term, self.conf.clone(), self.sm.snapshot_data());
        self.snap_index = self.applied;
        self.send_when_durable(snap);
    }

    /// Sends `snap` to the raft thread if the state machine holds its index durably, else keeps
    /// it for the next turn.
    fn send_when_durable(&mut self, snap: Snapshot) {
        let index = snap.get_metadata().index;
        if self.sm.durable_index().is_some_and(|d| d < index) {
            self.undurable = Some(snap);
            return;
        }
        let _ = self.events.send(Event::Snapshot(Box::new(snap)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// A state machine that records what it is told, optionally slowly.
    #[derive(Clone, Default)]
    struct Recorder {
        log: Arc<Mutex<Vec<String>>>,
        delay: Option<Duration>,
        gate: Option<Arc<std::sync::Barrier>>,
        /// Applying this index makes the recorder wish for a snapshot.
        wish_at: Option<u64>,
        wish: Arc<std::sync::atomic::AtomicBool>,
        /// Set: the recorder commits in the background, durable up to this index (a sync makes
        /// everything applied durable).
        durable: Option<Arc<std::sync::atomic::AtomicU64>>,
        applied: u64,
    }

    impl Recorder {
        fn say(&self, s: String) {
            self.log.lock().push(s);
        }
        fn seen(&self) -> Vec<String> {
            self.log.lock().clone()
        }
    }

    impl StateMachine for Recorder {
        fn applied_index(&self) -> u64 {
            0
        }
        fn applied_term(&self) -> u64 {
            0
        }
        fn apply(&mut self, e: &Entry) {
            if let Some(g) = self.gate.take() {
                g.wait();
            }
            if let Some(d) = self.delay {
                std::thread::sleep(d);
            }
            self.say(format!("apply {}", e.index));
            self.applied = e.index;
            if self.wish_at == Some(e.index) {
                self.wish.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        fn take_snapshot_wish(&mut self) -> bool {
            self.wish.swap(false, std::sync::atomic::Ordering::SeqCst)
        }
        fn apply_conf_change(&mut self, e: &Entry, cs: &ConfState) {
            self.say(format!("conf {} {:?}", e.index, cs.voters));
        }
        fn skip_conf_change(&mut self, e: &Entry) {
            self.say(format!("skip conf {}", e.index));
        }
        fn maintain(&mut self) {}
        fn sync(&mut self) -> Result<(), String> {
            self.say("sync".into());
            if let Some(d) = &self.durable {
                d.store(self.applied, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        }
        fn durable_index(&self) -> Option<u64> {
            self.durable.as_ref().map(|d| d.load(std::sync::atomic::Ordering::SeqCst))
        }
        fn snapshot_data(&self) -> Vec<u8> {
            Vec::new()
        }
        fn restore(&mut self, snap: &Snapshot, _backend: Option<std::path::PathBuf>) -> Result<(), String> {
            self.say(format!("restore {}", snap.get_metadata().index));
            Ok(())
        }
        fn on_stop(&mut self) {
            self.say("stop".into());
        }
    }

    fn entry(index: u64) -> Committed {
        let e = Entry { index, term: 1, ..Default::default() };
        Committed { entry: e, conf: None, handed: Instant::now() }
    }

    fn stage(sm: Recorder, queue: usize, snapshot_count: u64) -> (Stage, Arc<NodeStatus>) {
        let status = Arc::new(NodeStatus::default());
        let cfg = ApplyConfig { snapshot_count, idle: Duration::from_millis(10), queue };
        let s = Stage::start(sm, cfg, status.clone(), LogStore::default(), (0, 0, ConfState::default()), 0).unwrap();
        (s, status)
    }

    #[test]
    fn entries_are_applied_in_order_and_reads_wait_for_their_index() {
        let sm = Recorder::default();
        let (mut st, status) = stage(sm.clone(), 4, 1_000);
        let (r5, rx5) = oneshot::channel();
        let (r2, rx2) = oneshot::channel();
        // A read confirmed at 5 before entries up to 5 exist: answered only after entry 5.
        assert!(st.send(Task::Reads { index: 5, senders: vec![r5], confirmed: Instant::now() }));
        assert!(st.send(Task::Entries((1..=3).map(entry).collect())));
        assert!(st.send(Task::Reads { index: 2, senders: vec![r2], confirmed: Instant::now() }));
        assert_eq!(rx2.blocking_recv().unwrap(), Ok(2));
        assert!(status.applied() >= 3);
        let mut cc = entry(4);
        cc.entry.set_entry_type(EntryType::EntryConfChange);
        cc.conf = Some(ConfState { voters: vec![1, 2], ..Default::default() });
        // A conf change raft refused (no configuration after it): the state machine hears of
        // it, so that its proposer is answered at once.
        let mut refused = entry(5);
        refused.entry.set_entry_type(EntryType::EntryConfChange);
        assert!(st.send(Task::Entries(vec![cc, refused])));
        assert_eq!(rx5.blocking_recv().unwrap(), Ok(5));
        st.stop();
        let seen = sm.seen();
        assert_eq!(&seen[..5], ["apply 1", "apply 2", "apply 3", "conf 4 [1, 2]", "skip conf 5"]);
        assert_eq!(status.applied(), 5);
    }

    #[test]
    fn a_full_queue_holds_the_sender_back() {
        let gate = Arc::new(std::sync::Barrier::new(2));
        let sm = Recorder { gate: Some(gate.clone()), ..Default::default() };
        let (mut st, status) = stage(sm.clone(), 2, 1_000);
        // The stage blocks inside entry 1 until the gate opens; then the queue (2) fills up.
        assert!(st.send(Task::Entries(vec![entry(1)])));
        let mut queued = 0;
        for i in 2..10 {
            match st.try_send(Task::Entries(vec![entry(i)])) {
                Ok(()) => queued += 1,
                Err(mpsc::TrySendError::Full(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(queued <= 3, "the queue took {queued} tasks while the stage was blocked");
        assert_eq!(status.applied(), 0, "nothing applied while the state machine is blocked");
        gate.wait();
        let (r, rx) = oneshot::channel();
        assert!(st.send(Task::Reads { index: 1 + queued, senders: vec![r], confirmed: Instant::now() }));
        assert_eq!(rx.blocking_recv().unwrap(), Ok(1 + queued));
        st.stop();
    }

    #[test]
    fn stop_applies_what_was_queued_then_fails_waiting_reads() {
        let sm = Recorder { delay: Some(Duration::from_millis(2)), ..Default::default() };
        let (mut st, status) = stage(sm.clone(), 64, 1_000);
        assert!(st.send(Task::Entries((1..=20).map(entry).collect())));
        let (r, rx) = oneshot::channel();
        assert!(st.send(Task::Reads { index: 100, senders: vec![r], confirmed: Instant::now() }));
        st.stop();
        assert_eq!(status.applied(), 20, "everything queued before the stop is applied");
        assert_eq!(rx.blocking_recv().unwrap(), Err(ProposeError::Stopped));
        let seen = sm.seen();
        assert_eq!(seen[seen.len() - 2..], ["sync", "stop"]);
        assert!(!st.send(Task::Entries(vec![entry(21)])), "a stopped stage takes no more work");
    }

    #[test]
    fn a_snapshot_from_the_leader_waits_for_the_entries_before_it() {
        let sm = Recorder { delay: Some(Duration::from_millis(1)), ..Default::default() };
        let (mut st, status) = stage(sm.clone(), 64, 1_000);
        assert!(st.send(Task::Entries((1..=10).map(entry).collect())));
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 50;
        snap.mut_metadata().term = 3;
        // Installed only after entries 1..=10, which were in flight.
        st.restore(snap, None).unwrap();
        assert_eq!(status.applied(), 50);
        // Entries the snapshot covers are skipped; the next ones follow it.
        assert!(st.send(Task::Entries((45..=52).map(entry).collect())));
        st.stop();
        let seen = sm.seen();
        let applied: Vec<&String> = seen.iter().filter(|s| s.starts_with("apply") || s.starts_with("restore")).collect();
        let mut want: Vec<String> = (1..=10).map(|i| format!("apply {i}")).collect();
        want.push("restore 50".into());
        want.extend((51..=52).map(|i| format!("apply {i}")));
        assert_eq!(applied, want.iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_snapshot_is_taken_every_snapshot_count_entries() {
        let sm = Recorder::default();
        let (mut st, _status) = stage(sm.clone(), 64, 5);
        // One entry per task, each applied before the next is sent: a snapshot is due once more
        // than 5 entries were applied since the last, and taken then, not at stop.
        let mut snaps = Vec::new();
        for i in 1..=12 {
            assert!(st.send(Task::Entries(vec![entry(i)])));
            let (r, rx) = oneshot::channel();
            assert!(st.send(Task::Reads { index: i, senders: vec![r], confirmed: Instant::now() }));
            rx.blocking_recv().unwrap().unwrap();
            // At 6 and 12 a snapshot is due: its event may follow the read's answer, so wait
            // for it (bounded); were it taken only at stop, this wait would fail.
            let due = i % 6 == 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let syncs_before = sm.seen().iter().filter(|s| *s == "sync").count();
                let mut got = false;
                for e in st.events() {
                    let Event::Snapshot(s) = e;
                    snaps.push((s.get_metadata().index, syncs_before));
                    got = true;
                }
                if !due || got {
                    break;
                }
                assert!(Instant::now() < deadline, "no snapshot after entry {i}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let at: Vec<u64> = snaps.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, [6, 12], "a snapshot every 5 entries past the last one");
        assert!(snaps.iter().enumerate().all(|(n, (_, syncs))| *syncs > n), "made durable before each snapshot: {snaps:?}");
        st.stop();
    }

    /// The indexes of the snapshots the stage has handed over since last asked.
    fn snapshot_indexes(st: &Stage) -> Vec<u64> {
        st.events()
            .into_iter()
            .map(|e| {
                let Event::Snapshot(s) = e;
                s.get_metadata().index
            })
            .collect()
    }

    /// Waits until the stage answered a read at `index` (it has turned its loop once more).
    fn read(st: &mut Stage, index: u64) {
        let (r, rx) = oneshot::channel();
        assert!(st.send(Task::Reads { index, senders: vec![r], confirmed: Instant::now() }));
        rx.blocking_recv().unwrap().unwrap();
    }

    #[test]
    fn a_snapshot_waits_for_the_background_commit_while_the_applies_go_on() {
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sm = Recorder { durable: Some(durable.clone()), ..Default::default() };
        let (mut st, _status) = stage(sm.clone(), 64, 5);
        for i in 1..=6 {
            assert!(st.send(Task::Entries(vec![entry(i)])));
        }
        read(&mut st, 6);
        // Due at 6, not durable: the entries after it are applied all the same, and the
        // snapshot waits (two more turns of the loop, each looking at it again).
        for i in 7..=8 {
            assert!(st.send(Task::Entries(vec![entry(i)])));
        }
        read(&mut st, 8);
        read(&mut st, 8);
        assert!(st.events().is_empty(), "a snapshot went before its index was durable");
        assert!(!sm.seen().iter().any(|s| s == "sync"), "the apply stage synced: {:?}", sm.seen());
        // The background commit reaches 8: the snapshot at 6 goes, without a sync.
        durable.store(8, std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        let snap = loop {
            if let Some(Event::Snapshot(s)) = st.events().into_iter().next() {
                break s;
            }
            assert!(Instant::now() < deadline, "no snapshot once durable");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(snap.get_metadata().index, 6);
        assert!(!sm.seen().iter().any(|s| s == "sync"), "the apply stage synced: {:?}", sm.seen());
        st.stop();
    }

    #[test]
    fn a_snapshot_waiting_for_the_background_commit_goes_out_at_stop() {
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sm = Recorder { durable: Some(durable), ..Default::default() };
        let (mut st, _status) = stage(sm.clone(), 64, 5);
        for i in 1..=7 {
            assert!(st.send(Task::Entries(vec![entry(i)])));
        }
        read(&mut st, 7);
        read(&mut st, 7);
        assert!(st.events().is_empty(), "a snapshot went before its index was durable");
        // The final sync makes it durable: the raft thread gets it as the stage ends.
        st.stop();
        let at = snapshot_indexes(&st);
        // Due once 6 entries are applied (at 6 or 7: the entries may arrive in one batch).
        assert!(at.len() == 1 && (6..=7).contains(&at[0]), "one snapshot, at 6 or 7: {at:?}");
    }

    #[test]
    fn a_wished_snapshot_is_taken_at_once_whatever_the_count() {
        let sm = Recorder { wish_at: Some(3), ..Default::default() };
        let (mut st, _status) = stage(sm.clone(), 64, 1_000);
        for i in 1..=5 {
            assert!(st.send(Task::Entries(vec![entry(i)])));
        }
        read(&mut st, 5);
        st.stop();
        let at = snapshot_indexes(&st);
        // Entries may be applied in one batch or several: the snapshot is at or after 3, once.
        assert_eq!(at.len(), 1, "one snapshot: {at:?}");
        assert!((3..=5).contains(&at[0]), "{at:?}");
    }
}

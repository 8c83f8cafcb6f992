//! The raft driver: one thread owns the `RawNode`; everything else talks to it via [`NodeHandle`].
//!
//! Loop: take every queued message (proposals, reads, peer messages) so that many proposals share
//! one Ready and one fsync; tick on time; then handle the Ready in etcd's order: send messages,
//! install a leader's snapshot (through the apply stage), persist entries and hard state
//! (fsync), send the messages that had to wait for persistence (a follower's acknowledgement
//! goes out right after its fsync), hand committed entries and confirmed reads to the apply
//! stage ([`crate::apply`]), advance. The raft thread never applies anything and never touches
//! the state machine: it waits for the apply stage only when its queue is full and while a
//! leader's snapshot is installed. Snapshots the apply stage takes come back as events, which
//! this thread saves (snapshot file, WAL marker, log compaction).

use crate::apply::{ApplyConfig, Committed, Event, ReadSender, Stage, Task};
use crate::disk::{Disk, DiskError};
use crate::hops::{self, Hop};
use crate::inbox::{Bell, Closed, Sleeper};
pub use crate::machine::{ProposeError, StateMachine};
pub use crate::status::NodeStatus;
use crate::storage::LogStore;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, Snapshot};
use raft::{Config, RawNode, ReadOnlyOption, StateRole};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Where the leader put a proposal in its log: the entry at `index` of `term` is this proposal
/// if it is ever applied. An entry of another term applied at `index` means it was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    pub index: u64,
    pub term: u64,
}

/// Replication progress of one member, as the leader sees it.
#[derive(Debug, Clone, Copy)]
pub struct PeerProgress {
    pub matched: u64,
    pub leader_commit: u64,
    pub recent_active: bool,
}

/// Sends raft messages to other members, and may read some of theirs on the raft thread.
/// Nothing here may block.
pub trait Transport: Send + 'static {
    fn send(&mut self, msgs: Vec<Message>);

    /// Called once, before the raft thread starts: connections registered with `registry`
    /// (with tokens below [`crate::inbox::BELL`]) wake the raft thread when they are readable,
    /// and are then read by [`Transport::receive`] on it.
    fn attach(&mut self, _registry: &mio::Registry) {}

    /// Called on the raft thread on every pass of its loop, with the tokens of the registered
    /// connections that became readable since the last call: the raft messages read go to `out`.
    fn receive(&mut self, _ready: &[mio::Token], _out: &mut Vec<Message>) {}
}

/// A transport for a cluster of one.
pub struct NoTransport;
impl Transport for NoTransport {
    fn send(&mut self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            tracing::debug!(count = msgs.len(), "raft: no transport; dropping messages");
        }
    }
}

/// Raft settings, in etcd's terms.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// `--heartbeat-interval`: one tick.
    pub tick: Duration,
    /// `--election-timeout` in ticks.
    pub election_ticks: usize,
    /// `--snapshot-count`.
    pub snapshot_count: u64,
    /// Entries kept after a snapshot for slow followers (etcd: 5000).
    pub catchup_entries: u64,
    /// Bytes of entries' data the log keeps in memory: older applied entries of the
    /// `catchup_entries` are read back from the WAL when a follower needs them
    /// ([`crate::storage::Core::cool`]).
    pub log_memory_bytes: usize,
    /// Tasks the apply stage's queue holds ([`crate::apply::QUEUE`]).
    pub apply_queue: usize,
    /// Ticks come only from [`NodeHandle::tick`], never from the clock (deterministic tests
    /// drive several nodes in one process this way); `tick` then paces only the apply stage's
    /// idle maintenance.
    pub manual_ticks: bool,
}

/// The answer to a proposal: where the leader put it (unknown when a follower forwarded it).
type ProposeDone = oneshot::Sender<Result<Option<Proposed>, ProposeError>>;

enum Msg {
    Propose {
        data: Vec<u8>,
        done: ProposeDone,
        at: Instant,
        /// Taken while the apply lags up to twice as far (see [`NodeHandle::propose_with`]).
        priority: bool,
    },
    ReadIndex {
        done: oneshot::Sender<Result<u64, ProposeError>>,
    },
    Step(Box<Message>),
    ProposeConfChange {
        cc: crate::wire::MemberChange,
        done: ProposeDone,
    },
    InstallSnapshot {
        msg: Box<Message>,
        backend: std::path::PathBuf,
    },
    Unreachable(u64),
    SnapshotDone {
        to: u64,
        ok: bool,
    },
    TransferLeader(u64),
    Progress {
        done: oneshot::Sender<HashMap<u64, PeerProgress>>,
    },
    /// One tick (with [`NodeConfig::manual_ticks`]).
    Tick,
    /// Ticks at once, while no leader is known (see [`NodeHandle::advance_ticks`]).
    AdvanceTicks(usize),
    Stop,
}

/// Applied entries between two compactions of the in-memory log (etcd 3.7's
/// memorySnapshotCount): the log then holds about `catchup_entries` applied entries, not up to
/// `snapshot_count` more between disk snapshots.
const LOG_COMPACT_EVERY: u64 = 100;
/// Election timeouts a leader keeps the entries after a snapshot it sent while the follower
/// installs it without answering ([`Driver::keep_for_followers`]).
const INSTALL_GRACE_ELECTIONS: u64 = 30;
/// Bound of the node's inbox: a full inbox answers "too many requests" instead of queueing more.
const INBOX: usize = 65_536;
/// Most messages taken from the inbox before the next Ready is handled.
const BATCH: usize = 8_192;
/// Committed entries the apply stage may lag behind before proposals are refused with "too many
/// requests" (etcd's maxGapBetweenApplyAndCommitIndex).
const MAX_APPLY_GAP: u64 = 5_000;
/// Longest wait for the inbox with manual ticks (nothing happens without a message then).
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How often the raft loop hands its backlog to a busy apply stage.
const BACKLOG_POLL: Duration = Duration::from_millis(1);
/// Most bytes of committed entries in one Ready (one task of the apply stage).
const MAX_COMMITTED_PER_READY: u64 = 16 << 20;

/// How the server talks to the node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: SyncSender<Msg>,
    bell: Arc<Bell>,
    pub status: Arc<NodeStatus>,
}

impl NodeHandle {
    fn send(&self, m: Msg) -> Result<(), ProposeError> {
        self.tx.try_send(m).map_err(|e| match e {
            TrySendError::Full(_) => ProposeError::Busy,
            TrySendError::Disconnected(_) => ProposeError::Stopped,
        })?;
        self.bell.ring();
        Ok(())
    }

    /// As [`NodeHandle::send`], waiting for room in the inbox.
    fn send_waiting(&self, m: Msg) {
        if self.tx.send(m).is_ok() {
            self.bell.ring();
        }
    }

    /// Proposes `data`; returns once raft has taken it (not once it is committed), with where
    /// it went in the log when this member leads.
    pub async fn propose(&self, data: Vec<u8>) -> Result<Option<Proposed>, ProposeError> {
        self.propose_with(data, false).await
    }

    /// [`NodeHandle::propose`]; a `priority` proposal is still taken while the apply stage lags
    /// up to twice as far behind the commit index as others may (etcd 3.7's PriorityRequest,
    /// for lease revocations).
    pub async fn propose_with(&self, data: Vec<u8>, priority: bool) -> Result<Option<Proposed>, ProposeError> {
        let (done, rx) = oneshot::channel();
        self.send(Msg::Propose { data, done, at: Instant::now(), priority })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Linearizable read barrier: returns once this member has applied everything committed when
    /// the read began (raft ReadIndex, answered after the apply caught up).
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        let (done, rx) = oneshot::channel();
        self.send(Msg::ReadIndex { done })?;
        rx.await.map_err(|_| ProposeError::Timeout)?
    }

    /// Hands a message from a peer to raft.
    pub fn step(&self, m: Message) -> Result<(), ProposeError> {
        self.send(Msg::Step(Box::new(m)))
    }

    /// Proposes a membership change (in etcd's encoding); returns once raft has taken it.
    pub async fn propose_conf_change(&self, cc: crate::wire::MemberChange) -> Result<Option<Proposed>, ProposeError> {
        let (done, rx) = oneshot::channel();
        self.send(Msg::ProposeConfChange { cc, done })?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Hands a snapshot message from the leader to raft, with the backend file received with it.
    pub fn install_snapshot(&self, msg: Message, backend: std::path::PathBuf) -> Result<(), ProposeError> {
        self.send(Msg::InstallSnapshot { msg: Box::new(msg), backend })
    }

    /// Tells raft a member could not be reached (its messages were dropped).
    pub fn report_unreachable(&self, id: u64) {
        let _ = self.send(Msg::Unreachable(id));
    }

    /// Tells raft how sending a snapshot to `to` ended.
    pub fn report_snapshot(&self, to: u64, ok: bool) {
        let _ = self.send(Msg::SnapshotDone { to, ok });
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        self.send(Msg::TransferLeader(to))
    }

    /// Replication progress of every member (empty unless this member leads).
    pub async fn progress(&self) -> Result<HashMap<u64, PeerProgress>, ProposeError> {
        let (done, rx) = oneshot::channel();
        self.send(Msg::Progress { done })?;
        rx.await.map_err(|_| ProposeError::Stopped)
    }

    /// Advances a node started with [`NodeConfig::manual_ticks`] by one tick (a heartbeat
    /// interval); waits while the inbox is full.
    pub fn tick(&self) {
        self.send_waiting(Msg::Tick);
    }

    /// Moves the election clock `n` ticks on at once if this member knows no leader (etcd's
    /// fast-forward at start, once peers are connected: a restarted cluster elects in a few
    /// ticks instead of a whole election timeout). Ignored once a leader is known; best effort:
    /// dropped, without waiting, when the inbox is full (it is called from async tasks).
    pub fn advance_ticks(&self, n: usize) {
        let _ = self.send(Msg::AdvanceTicks(n));
    }

    /// Wakes the raft thread if it sleeps (its transport has something for it to read).
    pub fn nudge(&self) {
        self.bell.ring_always();
    }

    /// Asks the node to stop after the current Ready.
    pub fn stop(&self) {
        self.send_waiting(Msg::Stop);
    }
}

struct PendingRead {
    senders: Vec<ReadSender>,
    issued_tick: u64,
    issued: Instant,
}

/// Most proposals whose start time the leader remembers (for the hop metrics).
const TIMED_PROPOSALS: usize = 65_536;

struct Driver<T: Transport> {
    cfg: NodeConfig,
    node: RawNode<LogStore>,
    disk: Disk,
    stage: Stage,
    transport: T,
    status: Arc<NodeStatus>,
    snap_index: u64,
    conf_state: ConfState,
    /// The log's bootstrap entries (1..=this) add the initial members, which the configuration
    /// raft started with already has: they are not checked against it (etcd checks them against
    /// its empty member store, where they pass). 0 once the log starts at a snapshot.
    bootstrap_through: u64,
    /// Members removed from the cluster as of the entry handed over last: a change adding one
    /// again is refused at apply, as etcd's removed-member check refuses it. See [`removed_at`].
    removed: HashSet<u64>,
    ticks: u64,
    read_ctx: u64,
    /// Reads waiting for raft to confirm an index, by context (then the apply stage has them).
    reads_waiting: HashMap<u64, PendingRead>,
    reads_new: Vec<ReadSender>,
    last_leader: u64,
    /// The backend file that came with the snapshot message last stepped into raft.
    pending_backend: Option<std::path::PathBuf>,
    /// The apply stage has ended (a send failed): the node stops.
    stage_gone: bool,
    /// Leader: when each of its recent proposals entered the inbox, by log index.
    proposed_at: std::collections::BTreeMap<u64, Instant>,
    /// Follower: when the oldest append message not yet acknowledged was stepped.
    append_since: Option<Instant>,
    /// Set once asked to stop: the tick by which to stop even if leadership was not handed off.
    stopping: Option<u64>,
    /// Ask raft again for the reads still waiting (a new leader is known).
    reissue_reads: bool,
    /// Campaign once everything committed is applied (single-voter start).
    campaign_when_applied: bool,
    /// The applied index at which the in-memory log was last compacted.
    log_compacted_at: u64,
    /// The last compaction kept entries for a follower ([`Driver::keep_for_followers`]): try
    /// again at each tick, so that one found down lets them go without waiting for new entries.
    log_held: bool,
    /// Leader: followers sent a snapshot lately, with its index and the tick until which the
    /// entries after it are kept while the follower installs it (it answers nothing meanwhile).
    snapshot_sent: HashMap<u64, (u64, u64)>,
    /// The tick each peer was last heard from (any message it sent). Raft's own `recent_active`
    /// is cleared for every peer at each check-quorum round until the peer's next message, so a
    /// compaction at that moment found every follower inactive.
    heard_at: HashMap<u64, u64>,
}

/// Starts the node thread. `disk` is the member's recovered (or fresh) raft state.
pub fn start<S: StateMachine, T: Transport>(
    cfg: NodeConfig,
    disk: Disk,
    sm: S,
    transport: T,
    status: Arc<NodeStatus>,
) -> Result<(NodeHandle, std::thread::JoinHandle<Result<(), String>>), String> {
    let storage = LogStore::default();
    let mut disk = disk;
    let mut snap_index = 0;
    let mut snap_term = 0;
    let conf_state;
    let mut bootstrap_through = 0;
    let removed;
    {
        let mut core = storage.wl();
        if let Some(snap) = &disk.snapshot {
            snap_index = snap.get_metadata().index;
            snap_term = snap.get_metadata().term;
            core.apply_snapshot(snap.clone());
        } else {
            core.conf_state = ConfState { voters: disk.identity.initial_voters.clone(), ..Default::default() };
            bootstrap_through = disk.identity.initial_voters.len() as u64;
        }
        // The recovered entries move into the log: the disk keeps no copy of them.
        let (entries, placed) = (std::mem::take(&mut disk.entries), std::mem::take(&mut disk.placed));
        core.append(&entries, &placed).map_err(|e| format!("raft: cannot restore entries: {e}"))?;
        let last = core.last_index();
        let applied = sm.applied_index();
        removed = removed_at(sm.removed_members(), &entries, snap_index, applied);
        drop((entries, placed));
        // Those the backend holds already are applied: beyond the budget, read back when needed.
        core.cool(cfg.log_memory_bytes, applied);
        if applied > last {
            // The WAL lost its tail (a torn write was cut off) but the backend already holds the
            // effects of those committed entries: the backend is a snapshot at `applied`.
            tracing::warn!(
                applied,
                wal_last_index = last,
                "raft: the backend is ahead of the WAL; continuing from the backend as a snapshot"
            );
            // The configuration is the state machine's: membership changes applied after the
            // old snapshot are in it, not in the old snapshot (nor in the lost log tail).
            let conf = sm.conf_state().unwrap_or_else(|| core.conf_state.clone());
            let snap = crate::storage::snapshot_at(applied, sm.applied_term(), conf, sm.snapshot_data());
            disk.save_snapshot(&snap, u64::MAX).map_err(|e| format!("raft: cannot save snapshot: {e}"))?;
            snap_index = applied;
            snap_term = snap.get_metadata().term;
            core.apply_snapshot(snap);
        }
        let last = core.last_index();
        let mut hs = disk.hard_state.clone();
        if hs.term < snap_term {
            hs.term = snap_term;
        }
        // Entries in the backend were committed, even if the commit index was not yet persisted.
        hs.commit = hs.commit.max(snap_index).max(applied).min(last);
        core.hard_state = hs;
        core.applied_index = snap_index;
        core.applied_term = snap_term;
        core.applied_conf_state = core.conf_state.clone();
        core.app_data = sm.snapshot_data();
        conf_state = core.conf_state.clone();
    }
    let config = Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: 1,
        applied: snap_index,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 512,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        max_committed_size_per_ready: MAX_COMMITTED_PER_READY,
        ..Default::default()
    };
    config.validate().map_err(|e| format!("raft: bad configuration: {e}"))?;
    let node = RawNode::new(&config, storage.clone(), &crate::logger::logger()).map_err(|e| format!("raft: {e}"))?;
    status.applied.store(snap_index, Ordering::Release);
    status.log_first.store(storage.rl().first_index(), Ordering::Release);
    status.log_memory_first.store(storage.rl().hot_first(), Ordering::Release);
    let stage = Stage::start(
        sm,
        ApplyConfig { snapshot_count: cfg.snapshot_count, idle: cfg.tick, queue: cfg.apply_queue },
        status.clone(),
        storage,
        (snap_index, snap_term, conf_state.clone()),
        snap_index,
    )?;
    // A cluster of one need not wait for an election timeout: it campaigns as soon as the
    // committed log (e.g. the bootstrap configuration) is applied, as raft requires.
    let campaign_when_applied = disk.forced || (conf_state.voters == [cfg.id] && conf_state.learners.is_empty());
    let (tx, rx) = mpsc::sync_channel(INBOX);
    let (sleeper, bell) = Sleeper::new(rx).map_err(|e| format!("raft: cannot make the raft thread's poll: {e}"))?;
    let mut transport = transport;
    transport.attach(sleeper.registry());
    let handle = NodeHandle { tx, bell, status: status.clone() };
    let driver = Driver {
        cfg,
        node,
        disk,
        stage,
        transport,
        status,
        snap_index,
        conf_state,
        bootstrap_through,
        removed,
        ticks: 0,
        read_ctx: 0,
        reads_waiting: HashMap::new(),
        reads_new: Vec::new(),
        last_leader: 0,
        pending_backend: None,
        stage_gone: false,
        proposed_at: Default::default(),
        append_since: None,
        stopping: None,
        reissue_reads: false,
        campaign_when_applied,
        log_compacted_at: 0,
        log_held: false,
        snapshot_sent: HashMap::new(),
        heard_at: HashMap::new(),
    };
    let join = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || driver.run(sleeper))
        .map_err(|e| format!("raft: cannot start thread: {e}"))?;
    Ok((handle, join))
}

impl<T: Transport> Driver<T> {
    fn run(mut self, mut inbox: Sleeper<Msg>) -> Result<(), String> {
        let mut next_tick = Instant::now() + self.cfg.tick;
        // Sticky: a Stop handled in a pass that ends early (the campaign below) still counts.
        let mut stop = false;
        let mut ready = Vec::new();
        let mut received = Vec::new();
        let result = loop {
            let mut wait = next_tick.saturating_duration_since(Instant::now());
            if self.stage.backlogged() || self.campaign_when_applied {
                // Hand the backlog on as the stage makes room; a cluster of one campaigns as soon
                // as the stage has applied what is committed (it does not wake this thread).
                wait = wait.min(BACKLOG_POLL);
            }
            ready.clear();
            match inbox.next(wait, &mut ready) {
                Ok(Some(m)) => {
                    stop |= self.handle(m);
                    let mut n = 1;
                    while n < BATCH {
                        match inbox.try_next() {
                            Some(m) => stop |= self.handle(m),
                            None => break,
                        }
                        n += 1;
                    }
                }
                Ok(None) => {}
                Err(Closed) => stop = true,
            }
            // What the transport reads on this thread goes to raft as a peer message would.
            self.transport.receive(&ready, &mut received);
            for m in received.drain(..) {
                stop |= self.handle(Msg::Step(Box::new(m)));
            }
            if !self.stage.pump() {
                self.stage_gone = true;
            }
            self.flush_reads();
            if self.campaign_when_applied && self.status.applied() >= self.node.raft.raft_log.committed {
                self.campaign_when_applied = false;
                // Its Ready (a cluster of one is leader at once) is handled below, not a tick later.
                if let Err(e) = self.node.campaign() {
                    tracing::warn!(error = %e, "raft: campaign failed");
                }
            }
            if self.cfg.manual_ticks {
                // Only Msg::Tick ticks; the clock's deadline never comes.
                next_tick = Instant::now() + IDLE_WAIT;
            } else if Instant::now() >= next_tick {
                self.tick();
                next_tick += self.cfg.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.cfg.tick;
                }
            }
            if let Err(e) = self.on_ready() {
                break Err(e.to_string());
            }
            self.status.ticks.store(self.ticks, Ordering::Release);
            if let Err(e) = self.on_stage_events() {
                break Err(e.to_string());
            }
            self.compact_memory_log();
            if self.stage_gone {
                break Err("the apply stage stopped".into());
            }
            if stop && self.stopping.is_none() {
                self.stopping = Some(self.ticks + self.cfg.election_ticks as u64);
                self.hand_off_leadership();
            }
            if let Some(deadline) = self.stopping {
                if !self.status.is_leader.load(Ordering::Acquire) || self.ticks >= deadline || self.voters() <= 1 {
                    break Ok(());
                }
            }
        };
        // Everything handed over is applied and made durable before the node reports stopped.
        self.stage.stop();
        let result = result.and(self.on_stage_events().map_err(|e| e.to_string()));
        self.status.stopped.store(true, Ordering::Release);
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft: node stopped on a fatal error");
        }
        result
    }

    /// A proposal carrying membership changes in etcd's encoding (`wire::MemberChange`), from
    /// this member or forwarded by a follower. raft-rs's leader parses such entries with its own
    /// numbering, which has no 3 (etcd's learner add), so on the leader this makes the checks
    /// raft-rs's leader makes for a proposal (a leader transfer or a leader outside the
    /// configuration drops it; a change proposed while another is not yet applied becomes an
    /// empty entry, raft's one-change-at-a-time rule) and appends and broadcasts the entries
    /// itself. Keel and etcd propose single (v1) changes only, so raft never enters a joint
    /// configuration from these. Elsewhere raft forwards the proposal to the leader unparsed.
    fn propose_member_changes(&mut self, mut m: Message) -> raft::Result<()> {
        let r = &mut self.node.raft;
        if r.state != StateRole::Leader {
            return r.step(m);
        }
        if r.lead_transferee.is_some() || r.prs().get(r.id).is_none() {
            return Err(raft::Error::ProposalDropped);
        }
        for (i, e) in m.mut_entries().iter_mut().enumerate() {
            if e.get_entry_type() != EntryType::EntryConfChange {
                continue;
            }
            if r.has_pending_conf() {
                tracing::info!(index = r.pending_conf_index, "raft: ignoring conf change: possible unapplied conf change");
                *e = Entry::default();
            } else {
                r.pending_conf_index = r.raft_log.last_index() + i as u64 + 1;
            }
        }
        if !r.append_entry(m.mut_entries()) {
            return Err(raft::Error::ProposalDropped);
        }
        r.bcast_append();
        Ok(())
    }

    /// One tick of raft's logical clock: elections, heartbeats, read expiry.
    fn tick(&mut self) {
        self.node.tick();
        self.ticks += 1;
        self.expire_reads();
        let (ticks, prs) = (self.ticks, self.node.raft.prs());
        self.snapshot_sent.retain(|id, (index, until)| ticks < *until && prs.get(*id).is_some_and(|p| p.matched < *index));
        if self.log_held {
            self.trim_memory_log();
        }
    }

    /// Handles one inbox message; returns true on Stop.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Tick => self.tick(),
            Msg::AdvanceTicks(n) => {
                if self.node.raft.leader_id == raft::INVALID_ID {
                    for _ in 0..n {
                        self.tick();
                    }
                }
            }
            Msg::Propose { data, done, at, priority } => {
                let r = self.apply_gap_ok(priority).and_then(|()| self.node.propose(vec![], data).map_err(|_| ProposeError::NoLeader));
                let placed = r.map(|()| self.proposed());
                if let Ok(Some(p)) = placed {
                    if self.proposed_at.len() < TIMED_PROPOSALS {
                        self.proposed_at.insert(p.index, at);
                    }
                }
                let _ = done.send(placed);
            }
            Msg::ReadIndex { done } => self.reads_new.push(done),
            Msg::Step(m) => {
                if m.from != 0 {
                    self.heard_at.insert(m.from, self.ticks);
                }
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgAppend && !m.entries.is_empty() && self.append_since.is_none() {
                    self.append_since = Some(Instant::now());
                }
                let conf_proposal = m.get_msg_type() == raft::eraftpb::MessageType::MsgPropose
                    && m.get_entries().iter().any(|e| e.get_entry_type() == EntryType::EntryConfChange);
                let r = if conf_proposal { self.propose_member_changes(*m) } else { self.node.step(*m) };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "raft: step failed");
                }
            }
            Msg::ProposeConfChange { cc, done } => {
                // What RawNode::propose_conf_change does, with etcd's encoding of the change.
                let mut e = Entry::default();
                e.set_entry_type(EntryType::EntryConfChange);
                e.data = cc.encode().into();
                let mut m = Message::default();
                m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
                m.set_entries(vec![e].into());
                let r = self.propose_member_changes(m).map_err(|_| ProposeError::NoLeader);
                let _ = done.send(r.map(|()| self.proposed()));
            }
            Msg::InstallSnapshot { msg, backend } => {
                if let Some(old) = self.pending_backend.replace(backend) {
                    let _ = keel_reclaim::remove(&old);
                }
                let index = msg.get_snapshot().get_metadata().index;
                if let Err(e) = self.node.step(*msg) {
                    tracing::warn!(error = %e, "raft: snapshot message rejected");
                }
                // Raft takes a snapshot by making it its unstable one; one it ignores (older than
                // what this member has committed, say) leaves its backend file to be removed.
                let taken = self.node.raft.raft_log.unstable_snapshot().as_ref().is_some_and(|s| s.get_metadata().index == index);
                if !taken {
                    if let Some(file) = self.pending_backend.take() {
                        tracing::info!(index, file = %file.display(), "raft: snapshot not needed; its backend file removed");
                        let _ = keel_reclaim::remove(&file);
                    }
                }
            }
            Msg::Unreachable(id) => self.node.report_unreachable(id),
            Msg::SnapshotDone { to, ok } => {
                let sending = self.node.raft.prs().get(to).filter(|p| p.state == raft::ProgressState::Snapshot);
                if let (true, Some(pr)) = (ok, sending) {
                    let until = self.ticks + INSTALL_GRACE_ELECTIONS * self.cfg.election_ticks as u64;
                    self.snapshot_sent.insert(to, (pr.pending_snapshot, until));
                }
                let st = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                self.node.report_snapshot(to, st);
            }
            Msg::TransferLeader(to) => self.node.transfer_leader(to),
            Msg::Progress { done } => {
                let mut out = HashMap::new();
                if self.node.raft.state == StateRole::Leader {
                    let commit = self.node.raft.raft_log.committed;
                    for (id, pr) in self.node.raft.prs().iter() {
                        out.insert(*id, PeerProgress { matched: pr.matched, leader_commit: commit, recent_active: pr.recent_active });
                    }
                }
                let _ = done.send(out);
            }
            Msg::Stop => return true,
        }
        false
    }

    /// Refuses new proposals while the apply stage lags too far behind the commit index (twice
    /// as far for a priority proposal).
    fn apply_gap_ok(&self, priority: bool) -> Result<(), ProposeError> {
        let limit = if priority { 2 * MAX_APPLY_GAP } else { MAX_APPLY_GAP };
        if self.node.raft.raft_log.committed.saturating_sub(self.status.applied()) > limit {
            return Err(ProposeError::Busy);
        }
        Ok(())
    }

    /// Where the proposal just taken went: the last entry of a leader's log.
    fn proposed(&self) -> Option<Proposed> {
        (self.node.raft.state == StateRole::Leader)
            .then(|| Proposed { index: self.node.raft.raft_log.last_index(), term: self.node.raft.term })
    }

    fn voters(&self) -> usize {
        self.conf_state.voters.len()
    }

    /// A leader that stops hands leadership to the most up-to-date other voter first.
    fn hand_off_leadership(&mut self) {
        if self.node.raft.state != StateRole::Leader || self.voters() <= 1 {
            return;
        }
        let me = self.cfg.id;
        let best = self
            .conf_state
            .voters
            .iter()
            .filter(|v| **v != me)
            .filter_map(|v| self.node.raft.prs().get(*v).map(|p| (*v, p.matched)))
            .max_by_key(|(_, m)| *m);
        if let Some((to, _)) = best {
            tracing::info!(transferee = format!("{to:x}"), "raft: leader is stopping; transferring leadership");
            self.node.transfer_leader(to);
        }
    }

    /// Starts one ReadIndex round for all reads that arrived since the last one.
    fn flush_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        // keel-chaos's negative control for its pause faults: a member that serves linearizable
        // reads at its own commit index, without a ReadIndex round (a paused member, deposed
        // leader or lagging follower, then answers from its stale state: the stale reads of
        // etcd#20418).
        #[cfg(feature = "failpoints")]
        fail::fail_point!("raft::read_index_local", |_| {
            let index = self.node.raft.raft_log.committed;
            let senders = std::mem::take(&mut self.reads_new);
            self.queue_for_stage(Task::Reads { index, senders, confirmed: Instant::now() });
        });
        self.read_ctx += 1;
        let ctx = self.read_ctx;
        self.node.read_index(read_ctx(self.cfg.id, ctx));
        let senders = std::mem::take(&mut self.reads_new);
        self.reads_waiting.insert(ctx, PendingRead { senders, issued_tick: self.ticks, issued: Instant::now() });
    }

    /// Fails reads raft never confirmed (no leader, or the leader changed) after two election
    /// timeouts, so callers do not wait forever.
    fn expire_reads(&mut self) {
        let limit = 2 * self.cfg.election_ticks as u64;
        let now = self.ticks;
        // Raft does not retry a ReadIndex whose message got lost (no leader yet, a peer link
        // down): ask again every few ticks until it is answered or expires.
        let retry = (self.cfg.election_ticks as u64 / 2).max(1);
        for (ctx, r) in &self.reads_waiting {
            let age = now.saturating_sub(r.issued_tick);
            if age > 0 && age % retry == 0 {
                self.node.read_index(read_ctx(self.cfg.id, *ctx));
            }
        }
        self.reads_waiting.retain(|_, r| {
            if now.saturating_sub(r.issued_tick) > limit {
                for s in r.senders.drain(..) {
                    let _ = s.send(Err(ProposeError::Timeout));
                }
                false
            } else {
                true
            }
        });
    }

    fn on_ready(&mut self) -> Result<(), DiskError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }
        if let Some(ss) = rd.ss() {
            self.on_soft_state(ss.leader_id, ss.raft_state);
        }
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(snap)?;
        }
        let entries = rd.take_entries();
        let mut hs = rd.hs().cloned();
        // raft-rs reports a commit index that moved after its Ready (LightReady) without a hard
        // state: it rides with the next entries written (no fsync of its own), so the WAL's hard
        // state follows the commit as etcd's does.
        if hs.is_none() && !entries.is_empty() && self.node.raft.raft_log.committed > self.disk.saved_commit() {
            hs = Some(self.node.raft.hard_state());
        }
        if !entries.is_empty() || hs.is_some() {
            let placed = self.disk.save_ready(hs.as_ref(), &entries)?;
            for e in &entries {
                if let Some(t) = self.proposed_at.get(&e.index) {
                    hops::observe(Hop::Append, t.elapsed());
                }
            }
            let mut core = self.node.mut_store().wl();
            if !entries.is_empty() {
                core.append(&entries, placed).map_err(|e| DiskError::Decode { path: "raft log".into(), msg: e })?;
            }
            if let Some(hs) = hs {
                core.hard_state = hs;
            }
        }
        // Durable now: acknowledge before applying, so the leader's commit does not wait for
        // this member's apply (etcd applies on another goroutine for the same reason).
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
            if let Some(t) = self.append_since.take() {
                hops::observe(Hop::FollowerAppend, t.elapsed());
            }
        }
        // Entries first, then the reads confirmed in this Ready: a read's index may be an entry
        // handed over just now.
        self.hand_over(rd.take_committed_entries());
        for rs in rd.take_read_states() {
            let Some(ctx) = parse_read_ctx(self.cfg.id, &rs.request_ctx) else { continue };
            if let Some(p) = self.reads_waiting.remove(&ctx) {
                hops::observe(Hop::ReadConfirm, p.issued.elapsed());
                if self.status.applied() >= rs.index {
                    // Applied already (the common case on a leader): answered from here, one
                    // thread hop fewer. The stage publishes `applied` only after applying.
                    hops::observe(Hop::ReadApply, Duration::ZERO);
                    for s in p.senders {
                        let _ = s.send(Ok(rs.index));
                    }
                } else {
                    self.queue_for_stage(Task::Reads { index: rs.index, senders: p.senders, confirmed: Instant::now() });
                }
            }
        }
        let mut light = self.node.advance(rd);
        if let Some(c) = light.commit_index() {
            self.node.mut_store().wl().hard_state.commit = c;
        }
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        self.hand_over(light.take_committed_entries());
        // Raft's applied index is what the apply stage has been given: raft uses it only to
        // pace configuration changes, which are applied to raft as they are handed over.
        self.node.advance_apply();
        if std::mem::take(&mut self.reissue_reads) {
            for ctx in self.reads_waiting.keys() {
                self.node.read_index(read_ctx(self.cfg.id, *ctx));
            }
        }
        self.publish_status();
        Ok(())
    }

    /// Queues work for the apply stage without waiting for it (see [`Stage`]).
    fn queue_for_stage(&mut self, t: Task) {
        if !self.stage.queue(t) {
            self.stage_gone = true;
        }
    }

    /// Hands committed entries to the apply stage; configuration changes are applied to raft
    /// now, and the stage gets the configuration they lead to.
    fn hand_over(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(entries.len());
        let handed = Instant::now();
        for e in entries {
            if let Some(t) = self.proposed_at.remove(&e.index) {
                hops::observe(Hop::Commit, handed.duration_since(t));
            }
            let conf = match e.get_entry_type() {
                EntryType::EntryNormal => None,
                EntryType::EntryConfChange => match crate::wire::member_change(e.get_data()) {
                    Ok(cc) => {
                        let (voters, learners) = (&self.conf_state.voters, &self.conf_state.learners);
                        let member = |id: u64| {
                            if learners.contains(&id) {
                                Some(true)
                            } else {
                                voters.contains(&id).then_some(false)
                            }
                        };
                        let removed = &self.removed;
                        let checked = if e.index <= self.bootstrap_through {
                            Ok(())
                        } else {
                            cc.validate(member, learners.len(), |id| removed.contains(&id))
                        };
                        match checked {
                            // As etcd: a change its members refuse changes neither the
                            // configuration nor the member list (the stage skips it).
                            Err(why) => {
                                tracing::error!(
                                    index = e.index,
                                    node_id = format!("{:x}", cc.node_id),
                                    error = why,
                                    "Validation on configuration change failed"
                                );
                                None
                            }
                            Ok(()) => match cc.to_raft() {
                                Some(rc) if cc.kind == crate::wire::ChangeKind::RemoveNode => {
                                    self.removed.insert(cc.node_id);
                                    self.apply_conf_change(&e, &rc)
                                }
                                Some(cc) => self.apply_conf_change(&e, &cc),
                                // A member's peer URLs changed: the configuration stays.
                                None => Some(self.conf_state.clone()),
                            },
                        }
                    }
                    Err(err) => {
                        tracing::error!(index = e.index, error = %err, "raft: undecodable conf change");
                        None
                    }
                },
                EntryType::EntryConfChangeV2 => match crate::wire::conf_change_v2(e.get_data()) {
                    Ok(cc) => self.apply_conf_change(&e, &cc),
                    Err(err) => {
                        tracing::error!(index = e.index, error = %err, "raft: undecodable conf change");
                        None
                    }
                },
            };
            out.push(Committed { entry: e, conf, handed });
        }
        self.queue_for_stage(Task::Entries(out));
    }

    /// Saves the snapshots the apply stage took.
    fn on_stage_events(&mut self) -> Result<(), DiskError> {
        for ev in self.stage.events() {
            match ev {
                Event::Snapshot(snap) => self.save_local_snapshot(*snap)?,
            }
        }
        Ok(())
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        if leader != self.last_leader {
            let term = self.node.raft.term;
            if leader == 0 {
                tracing::info!(term, "raft: lost leader");
            } else {
                tracing::info!(leader = format!("{leader:x}"), term, "raft: elected leader");
            }
            if leader != 0 {
                self.status.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            self.last_leader = leader;
            // Reads asked while there was no leader (or of a leader that is gone) were dropped
            // by raft: ask the new leader, once this Ready is done (raft must not produce
            // messages between a Ready and its advance).
            self.reissue_reads = leader != 0;
        }
        self.status.leader.store(leader, Ordering::Release);
        self.status.is_leader.store(role == StateRole::Leader, Ordering::Release);
        let code = match role {
            StateRole::Follower => 0,
            StateRole::Candidate => 1,
            StateRole::Leader => 2,
            StateRole::PreCandidate => 3,
        };
        self.status.role.store(code, Ordering::Release);
        if role != StateRole::Leader {
            self.proposed_at.clear();
        }
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        self.status.term.store(raft.term, Ordering::Release);
        self.status.vote.store(raft.vote, Ordering::Release);
        self.status.commit.store(raft.raft_log.committed, Ordering::Release);
        self.status.last_index.store(raft.raft_log.last_index(), Ordering::Release);
    }

    /// Applies a committed configuration change to raft; returns the configuration after it.
    fn apply_conf_change(&mut self, e: &Entry, cc: &impl raft_proto::ConfChangeI) -> Option<ConfState> {
        match self.node.apply_conf_change(cc) {
            Ok(cs) => {
                self.node.mut_store().wl().conf_state = cs.clone();
                self.conf_state = cs.clone();
                Some(cs)
            }
            Err(err) => {
                tracing::warn!(index = e.index, error = %err, "raft: conf change rejected");
                None
            }
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), DiskError> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("raft::install_snapshot", |_| std::process::abort());
        let backend = self.pending_backend.take();
        // The apply stage installs it after every entry handed over before; raft waits.
        if let Err(e) = self.stage.restore(snap.clone(), backend) {
            return Err(DiskError::Decode { path: "snapshot".into(), msg: e });
        }
        self.disk.save_snapshot(&snap, u64::MAX)?;
        let idx = snap.get_metadata().index;
        let term = snap.get_metadata().term;
        tracing::info!(index = idx, term, "raft: installed snapshot from the leader");
        // Members the leader's snapshot no longer has were removed (those added and removed
        // while this member was behind are not known here; the state machine has them).
        let after = snap.get_metadata().get_conf_state().clone();
        let (before, removed) = (&self.conf_state, &mut self.removed);
        removed
            .extend(before.voters.iter().chain(&before.learners).filter(|id| !after.voters.contains(id) && !after.learners.contains(id)));
        self.conf_state = after;
        let mut log = self.node.mut_store().wl();
        log.apply_snapshot(snap);
        // The log starts after the snapshot now (the status' first index changes only here, at
        // a trim and at start).
        self.status.log_first.store(log.first_index(), Ordering::Release);
        self.status.log_memory_first.store(log.hot_first(), Ordering::Release);
        drop(log);
        self.snap_index = idx;
        Ok(())
    }

    /// Every [`LOG_COMPACT_EVERY`] applied entries, trims the in-memory log
    /// ([`Driver::trim_memory_log`]), as etcd 3.7 compacts its memory storage (the WAL keeps the
    /// entries until the next disk snapshot).
    fn compact_memory_log(&mut self) {
        if self.status.applied() >= self.log_compacted_at + LOG_COMPACT_EVERY {
            self.trim_memory_log();
        }
    }

    /// Drops the in-memory log's entries older than `catchup_entries` before the applied index
    /// and not needed by a follower being caught up; the one place the log is trimmed.
    fn trim_memory_log(&mut self) {
        let applied = self.status.applied();
        self.log_compacted_at = applied;
        let want = applied.saturating_sub(self.cfg.catchup_entries) + 1;
        let keep_from = want.min(self.keep_for_followers());
        self.log_held = keep_from < want;
        let mut log = self.node.mut_store().wl();
        log.compact(keep_from);
        log.cool(self.cfg.log_memory_bytes, applied);
        self.status.log_first.store(log.first_index(), Ordering::Release);
        self.status.log_memory_first.store(log.hot_first(), Ordering::Release);
    }

    /// The first entry the log must keep for followers being caught up and heard from within
    /// the last election timeout (`u64::MAX`: none): everything while one is sent a snapshot
    /// (it needs the entries after the snapshot's index once installed, however long the send
    /// takes; etcd pauses its compaction likewise), and from its next entry for one probed after
    /// a snapshot or a gap while it answers (it has not acknowledged the snapshot yet:
    /// installing a big one takes seconds). Found at 5 GB: a 70 s send, then the entries after
    /// it dropped before the follower could ask for them, and a snapshot again, over and over.
    fn keep_for_followers(&self) -> u64 {
        // Only a leader sends entries. A follower's progress records are what its last time as
        // a candidate or leader left (all probing from that moment's index): trusting them,
        // every follower kept its whole log since then in memory (found at 5 GB: 7.6 GB).
        if self.node.raft.state != StateRole::Leader {
            return u64::MAX;
        }
        let me = self.cfg.id;
        let mut keep = u64::MAX;
        for (id, pr) in self.node.raft.prs().iter() {
            if *id == me {
                continue;
            }
            // A follower installing a snapshot just sent answers nothing until it has: the
            // entries after it stay for a while however long that takes (found at 5 GB: a
            // 3-4 s install, the follower found inactive meanwhile, its entries dropped, and
            // another 7 GB snapshot, over and over).
            if let Some((index, _)) = self.snapshot_sent.get(id) {
                keep = keep.min(index + 1);
            }
            // Only for a follower heard from within the last election timeout: one that is down
            // (a snapshot to it may not fail for a while) must not hold the log. Not raft's
            // `recent_active`: check-quorum clears it for every peer each election timeout, and a
            // compaction right then dropped the entries after a snapshot being sent (found at
            // 500,000 keys with a writer: a learner sent a snapshot, then another, and another).
            let heard = self.heard_at.get(id).is_some_and(|t| self.ticks.saturating_sub(*t) <= self.cfg.election_ticks as u64);
            if !heard {
                continue;
            }
            match pr.state {
                raft::ProgressState::Snapshot => return 0,
                raft::ProgressState::Probe => keep = keep.min(pr.next_idx),
                raft::ProgressState::Replicate => {}
            }
        }
        keep
    }

    /// Saves a snapshot the apply stage took (its state machine is durable up to it) and lets
    /// the log before it go, keeping `catchup_entries` for slow followers.
    fn save_local_snapshot(&mut self, snap: Snapshot) -> Result<(), DiskError> {
        let (index, term) = (snap.get_metadata().index, snap.get_metadata().term);
        if index <= self.snap_index {
            // A leader's snapshot was installed since.
            return Ok(());
        }
        // The snapshot is at most the applied index: what the log keeps beyond it is the
        // applied index's bound. Trimmed first: the WAL keeps the entries the log still holds
        // (the cold ones are read back from it), and no more.
        self.trim_memory_log();
        let keep_from = self.node.store().rl().first_index();
        self.disk.save_snapshot(&snap, keep_from)?;
        tracing::info!(index, term, "raft: saved snapshot");
        self.snap_index = index;
        self.node.mut_store().wl().set_snapshot(snap);
        Ok(())
    }
}

/// A ReadIndex request context: this member's id and its read counter. The leader keys pending
/// reads by context, so contexts must be unique across members: with bare counters, two
/// followers' reads collide and the leader drops one (it would be answered only on retry).
fn read_ctx(member: u64, counter: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&member.to_be_bytes());
    b.extend_from_slice(&counter.to_be_bytes());
    b
}

/// The counter of a context made by [`read_ctx`] for `member`.
fn parse_read_ctx(member: u64, b: &[u8]) -> Option<u64> {
    let (m, c) = (b.get(..8)?, b.get(8..16)?);
    if u64::from_be_bytes(m.try_into().ok()?) != member {
        return None;
    }
    Some(u64::from_be_bytes(c.try_into().ok()?))
}

/// The removed members as of the snapshot the log replays from: the state machine's (as of
/// `applied`) less those the log's removals in (`snap_index`, `applied`] removed, which the
/// replay removes again in order. Seeding with the state machine's set alone would refuse a
/// replayed removal (its member already "removed") and leave raft's configuration with it.
fn removed_at(sm_removed: Vec<u64>, log: &[Entry], snap_index: u64, applied: u64) -> HashSet<u64> {
    let mut removed: HashSet<u64> = sm_removed.into_iter().collect();
    for e in log.iter().filter(|e| e.index > snap_index && e.index <= applied && e.get_entry_type() == EntryType::EntryConfChange) {
        if let Ok(cc) = crate::wire::member_change(e.get_data()) {
            if cc.kind == crate::wire::ChangeKind::RemoveNode {
                removed.remove(&cc.node_id);
            }
        }
    }
    removed
}

#[cfg(test)]
mod read_ctx_tests {
    use super::*;

    #[test]
    fn contexts_of_different_members_differ() {
        assert_ne!(read_ctx(1, 5), read_ctx(2, 5));
        assert_eq!(parse_read_ctx(1, &read_ctx(1, 5)), Some(5));
        assert_eq!(parse_read_ctx(2, &read_ctx(1, 5)), None);
        assert_eq!(parse_read_ctx(1, &[0; 8]), None);
    }

    /// The set a restart replays from: removals the log replays (after the snapshot, up to what
    /// the state machine applied) are taken out, to be made again in order; older ones and
    /// those beyond `applied` are as the state machine says.
    #[test]
    fn the_removed_set_is_the_one_at_the_snapshot_the_log_replays_from() {
        use crate::wire::{ChangeKind, MemberChange};
        let remove = |index: u64, node_id: u64| {
            let mut e = Entry::default();
            e.set_entry_type(EntryType::EntryConfChange);
            e.index = index;
            e.data = MemberChange { id: 0, kind: ChangeKind::RemoveNode, node_id, context: Default::default() }.encode().into();
            e
        };
        let log = vec![remove(11, 4), remove(12, 5), remove(20, 6)];
        let got = removed_at(vec![3, 4, 5], &log, 10, 15);
        assert_eq!(got, HashSet::from([3]), "4 and 5 are removed again by the replay");
        let got = removed_at(vec![3, 4, 5], &log, 11, 15);
        assert_eq!(got, HashSet::from([3, 4]), "the removal of 4 is in the snapshot");
    }
}

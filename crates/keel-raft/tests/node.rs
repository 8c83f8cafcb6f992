//! The node thread driven in-process: a state machine that records what it is told, a transport
//! that drops everything (one member) and the real WAL and snapshot files in a scratch
//! directory. Each test waits on state it can observe (status, files, what the state machine
//! saw), never on time alone.

use keel_raft::eraftpb::{ConfState, Entry, Message, MessageType, Snapshot};
use keel_raft::{start, Disk, Identity, NoTransport, NodeConfig, NodeStatus, StateMachine};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A state machine standing for a backend at `applied` holding the members `conf`; while
/// `gate` is closed, applying waits (a slow disk).
#[derive(Clone, Default)]
struct Backend {
    applied: u64,
    term: u64,
    conf: Option<ConfState>,
    seen: Arc<Mutex<Vec<u64>>>,
    gate: Option<Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>>,
}

impl StateMachine for Backend {
    fn applied_index(&self) -> u64 {
        self.applied
    }
    fn applied_term(&self) -> u64 {
        self.term
    }
    fn apply(&mut self, e: &Entry) {
        if let Some(g) = &self.gate {
            let mut open = g.0.lock().unwrap();
            while !*open {
                open = g.1.wait(open).unwrap();
            }
        }
        self.seen.lock().push(e.index);
    }
    fn apply_conf_change(&mut self, e: &Entry, _cs: &ConfState) {
        self.seen.lock().push(e.index);
    }
    fn maintain(&mut self) {}
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn snapshot_data(&self) -> Vec<u8> {
        Vec::new()
    }
    fn conf_state(&self) -> Option<ConfState> {
        self.conf.clone()
    }
    fn restore(&mut self, _snap: &Snapshot, _backend: Option<PathBuf>) -> Result<(), String> {
        Ok(())
    }
}

fn identity() -> Identity {
    Identity { cluster_id: 7, member_id: 1, initial_voters: vec![1] }
}

fn config() -> NodeConfig {
    NodeConfig {
        id: 1,
        tick: Duration::from_millis(10),
        election_ticks: 10,
        snapshot_count: 10_000,
        catchup_entries: 10,
        apply_queue: 2,
        manual_ticks: false,
        log_memory_bytes: 0,
    }
}

fn dirs(root: &Path) -> (PathBuf, PathBuf) {
    let (wal, snap) = (root.join("wal"), root.join("snap"));
    std::fs::create_dir_all(&snap).unwrap();
    (wal, snap)
}

/// Stops the node and waits for its thread, failing (not hanging) if it does not end.
fn stop(node: keel_raft::NodeHandle, join: std::thread::JoinHandle<Result<(), String>>) {
    node.stop();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(join.join());
    });
    let r = rx.recv_timeout(Duration::from_secs(20)).expect("the node thread did not stop");
    r.expect("node thread panicked").expect("node stopped with an error");
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A new member of one started on the WAL and snapshot directories under `root` with `sm`,
/// once it leads and applied its bootstrap entry: (node, its thread, status, what `sm` saw).
type Started = (keel_raft::NodeHandle, std::thread::JoinHandle<Result<(), String>>, Arc<NodeStatus>, Arc<Mutex<Vec<u64>>>);
fn leading(root: &Path, sm: Backend) -> Started {
    let (wal, snap) = dirs(root);
    let disk = Disk::open(&wal, &snap, identity(), &[(1, Vec::new())]).unwrap();
    let seen = sm.seen.clone();
    let status = Arc::new(NodeStatus::default());
    let (node, join) = start(config(), disk, sm, NoTransport, status.clone()).unwrap();
    // A member of one leads once its bootstrap entry is applied: term 2 at least.
    wait_for("leadership", || status.is_leader() && status.term() >= 2 && !seen.lock().is_empty());
    (node, join, status, seen)
}

/// Regression (defect 2 of the house issue): a member whose backend is ahead of its WAL (the
/// log's tail was lost after the backend took it, the `apply::restore` crash point) continued
/// from a snapshot built with the configuration of the old snapshot (here: the initial one),
/// and persisted it, losing the membership changes in between. The configuration now comes
/// from the members the backend holds, as etcd takes it from its backend.
#[test]
fn a_backend_ahead_of_the_wal_keeps_its_membership() {
    let t = tempfile::tempdir().unwrap();
    let (wal, snap) = dirs(t.path());
    // The WAL: only the bootstrap entry (member 1 added at index 1).
    drop(Disk::open(&wal, &snap, identity(), &[(1, Vec::new())]).unwrap());
    let disk = Disk::open(&wal, &snap, identity(), &[]).unwrap();
    assert_eq!(disk.entries.len(), 1);
    // The backend: applied up to 10, where member 2 had joined and member 3 waits as a learner.
    let members = ConfState { voters: vec![1, 2], learners: vec![3], ..Default::default() };
    let sm = Backend { applied: 10, term: 2, conf: Some(members.clone()), ..Default::default() };
    let status = Arc::new(NodeStatus::default());
    // Asked to stop at once: in the pass where it campaigns (everything committed is already
    // applied). Regression: that pass dropped the stop, and the node never ended.
    let (node, join) = start(config(), disk, sm, NoTransport, status.clone()).unwrap();
    stop(node, join);
    let disk = Disk::open(&wal, &snap, identity(), &[]).unwrap();
    let saved = disk.snapshot.expect("the backend's state is saved as a snapshot");
    assert_eq!(saved.get_metadata().index, 10);
    let cs = saved.get_metadata().get_conf_state();
    assert_eq!((cs.voters.clone(), cs.learners.clone()), (members.voters, members.learners), "membership of the backend");
}

/// A member of one campaigns as soon as its committed log is applied, and its Ready (it leads
/// at once) is handled then: neither waits for a tick. Regression: the raft thread looked for
/// "applied" only when woken (a tick, a message) and, once it had campaigned, slept until the
/// next tick before handling the Ready: two ticks (200 ms by default) at every start of a
/// member of one. Here a tick is an hour away.
#[test]
fn a_member_of_one_leads_without_waiting_for_a_tick() {
    let t = tempfile::tempdir().unwrap();
    let (wal, snap) = dirs(t.path());
    let disk = Disk::open(&wal, &snap, identity(), &[(1, Vec::new())]).unwrap();
    let sm = Backend::default();
    let seen = sm.seen.clone();
    let status = Arc::new(NodeStatus::default());
    let cfg = NodeConfig { tick: Duration::from_secs(3600), ..config() };
    let (node, join) = start(cfg, disk, sm, NoTransport, status.clone()).unwrap();
    wait_for("leadership with no tick", || status.is_leader() && !seen.lock().is_empty());
    assert_eq!(status.ticks(), 0, "no tick was needed");
    stop(node, join);
}

/// A snapshot raft does not take (from an older term, here) leaves no backend file behind.
#[test]
fn a_snapshot_raft_ignores_leaves_no_backend_file() {
    let t = tempfile::tempdir().unwrap();
    let (node, join, status, _) = leading(t.path(), Backend::default());
    let file = dirs(t.path()).1.join("0000000000000064.snap.db");
    std::fs::write(&file, b"a backend").unwrap();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = 2;
    m.to = 1;
    m.term = 1;
    let mut s = Snapshot::default();
    s.mut_metadata().index = 100;
    s.mut_metadata().term = 1;
    s.mut_metadata().mut_conf_state().voters = vec![1, 2];
    m.set_snapshot(s);
    node.install_snapshot(m, file.clone()).unwrap();
    wait_for("the ignored snapshot's backend file to go", || !file.exists());
    assert!(status.is_leader(), "the stale snapshot changed nothing");
    stop(node, join);
}

/// Regression (defect 5 of the house issue): the raft thread waited for room in the apply
/// stage's bounded queue, so a slow apply stopped ticks, heartbeats, proposals and everything
/// else the raft thread does. Now what the queue cannot take waits in the raft thread's backlog:
/// with apply stuck and its queue (2 tasks) full, proposals are still answered (placed, then
/// refused once the apply gap is too wide), and everything is applied in order once it resumes.
#[test]
fn a_stuck_apply_does_not_stop_the_raft_thread() {
    let t = tempfile::tempdir().unwrap();
    let gate = Arc::new((std::sync::Mutex::new(true), std::sync::Condvar::new()));
    let (node, join, status, seen) = leading(t.path(), Backend { gate: Some(gate.clone()), ..Default::default() });
    *gate.0.lock().unwrap() = false;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut placed = 0;
    for i in 0..40u32 {
        // One proposal at a time: each is its own Ready, its own task for the stage.
        let r = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), node.propose(i.to_be_bytes().to_vec())).await })
            .unwrap_or_else(|_| panic!("proposal {i} not answered while apply is stuck: the raft thread waits for the stage"));
        // Committed (a member of one) before the next: the stage's queue fills up. The index
        // is the one the proposal answer names: the published status catches up only at the
        // raft thread's next Ready, which may come after several proposals were taken.
        if let Ok(Some(p)) = r {
            placed += 1;
            wait_for("the commit", || status.commit() >= p.index);
        }
    }
    assert!(placed >= 10, "only {placed} proposals placed");
    let last = status.commit();
    assert!(
        status.applied() < last,
        "apply was stuck: applied {}, commit {last}, placed {placed}, seen {:?}",
        status.applied(),
        seen.lock()
    );
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    wait_for("everything applied", || status.applied() >= last);
    let seen = seen.lock().clone();
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "applied in order without gaps: {seen:?}");
    stop(node, join);
}

/// A restart moves the entries recovered from the WAL into the log, and those the backend
/// holds already leave memory at once (the log's budget, 0 here): what a follower may still ask
/// for is read back from the WAL. Before, the recovered entries stayed whole in memory twice
/// (the log and the disk's copy) until enough new entries came.
#[test]
fn a_restart_keeps_entries_the_backend_holds_only_in_the_wal() {
    let t = tempfile::tempdir().unwrap();
    let (node, join, status, _) = leading(t.path(), Backend::default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for i in 0..8u32 {
        rt.block_on(node.propose(vec![i as u8; 1000])).expect("proposal").expect("placed");
    }
    let last = status.commit();
    wait_for("everything applied", || status.applied() >= last);
    stop(node, join);

    let (wal, snap) = dirs(t.path());
    let disk = Disk::open(&wal, &snap, identity(), &[]).unwrap();
    let recovered = disk.entries.len() as u64;
    assert!(recovered >= 9, "the bootstrap entry, an empty one per term, the proposals: {recovered}");
    let sm = Backend { applied: last, term: status.term(), ..Default::default() };
    let status = Arc::new(NodeStatus::default());
    let (node, join) = start(config(), disk, sm, NoTransport, status.clone()).unwrap();
    assert_eq!(status.log_first_index(), 1, "the log still holds every recovered entry");
    assert_eq!(status.log_memory_first_index(), last + 1, "but none the backend holds in memory");
    wait_for("leadership again", || status.is_leader());
    stop(node, join);
}

//! Several real node threads in one process, wired by a channel transport the test controls
//! (it can cut a member off and heal it), with ticks given by the test ([`NodeConfig::manual_ticks`]):
//! raft's clock advances only when the test says so, so an election timeout, a read's expiry
//! or a stop's hand-off deadline is a number of ticks, not a wall-clock race. Each test waits
//! on state it observes (status, what each state machine applied), bounded by a number of
//! ticks.

use keel_raft::eraftpb::{ConfState, Entry, Message, MessageType, Snapshot};
use keel_raft::{start, Disk, Identity, NodeConfig, NodeHandle, NodeStatus, ProposeError, StateMachine, Transport};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Ticks in an election timeout.
const ELECTION_TICKS: usize = 10;
/// Most tick rounds a test waits for something before it fails.
const MAX_ROUNDS: usize = 4000;
/// Ticks after which a membership change not yet seen is proposed again.
const RETRY_ROUNDS: usize = 200;

/// What a member's state machine holds: the data of every normal entry applied, in order.
#[derive(Default)]
struct Applied {
    index: u64,
    term: u64,
    data: Vec<Vec<u8>>,
    conf: Option<ConfState>,
    /// Snapshots from the leader that replaced the state.
    restores: usize,
    /// While set, applying waits (a slow disk).
    held: bool,
}

/// The state machine: a log of applied data, shared with the test.
#[derive(Clone, Default)]
struct Machine(Arc<(std::sync::Mutex<Applied>, std::sync::Condvar)>);

impl Machine {
    fn with<R>(&self, f: impl FnOnce(&mut Applied) -> R) -> R {
        let mut a = self.0 .0.lock().unwrap();
        let r = f(&mut a);
        self.0 .1.notify_all();
        r
    }
    fn data(&self) -> Vec<Vec<u8>> {
        self.with(|a| a.data.clone())
    }
    fn hold(&self, held: bool) {
        self.with(|a| a.held = held);
    }
}

fn encode(data: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in data {
        out.extend_from_slice(&(d.len() as u32).to_be_bytes());
        out.extend_from_slice(d);
    }
    out
}

fn decode(mut b: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let n = b.get(..4).ok_or("short length")?;
        let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
        out.push(b.get(4..4 + n).ok_or("short record")?.to_vec());
        b = &b[4 + n..];
    }
    Ok(out)
}

impl StateMachine for Machine {
    fn applied_index(&self) -> u64 {
        self.with(|a| a.index)
    }
    fn applied_term(&self) -> u64 {
        self.with(|a| a.term)
    }
    fn apply(&mut self, e: &Entry) {
        let mut a = self.0 .0.lock().unwrap();
        while a.held {
            a = self.0 .1.wait(a).unwrap();
        }
        assert_eq!(e.index, a.index + 1, "entries are applied in order, each once");
        a.index = e.index;
        a.term = e.term;
        if !e.data.is_empty() {
            a.data.push(e.data.to_vec());
        }
    }
    fn apply_conf_change(&mut self, e: &Entry, cs: &ConfState) {
        self.with(|a| {
            assert_eq!(e.index, a.index + 1, "entries are applied in order, each once");
            a.index = e.index;
            a.term = e.term;
            a.conf = Some(cs.clone());
        });
    }
    fn skip_conf_change(&mut self, e: &Entry) {
        self.with(|a| {
            assert_eq!(e.index, a.index + 1, "entries are applied in order, each once");
            a.index = e.index;
            a.term = e.term;
        });
    }
    fn maintain(&mut self) {}
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn snapshot_data(&self) -> Vec<u8> {
        self.with(|a| encode(&a.data))
    }
    fn conf_state(&self) -> Option<ConfState> {
        self.with(|a| a.conf.clone())
    }
    fn restore(&mut self, snap: &Snapshot, backend: Option<PathBuf>) -> Result<(), String> {
        let data = decode(snap.get_data())?;
        if let Some(f) = backend {
            std::fs::remove_file(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        }
        self.with(|a| {
            a.index = snap.get_metadata().index;
            a.term = snap.get_metadata().term;
            a.data = data;
            a.conf = Some(snap.get_metadata().get_conf_state().clone());
            a.restores += 1;
        });
        Ok(())
    }
}

/// The network: every member's inbox, and who is cut off.
#[derive(Default)]
struct Net {
    handles: Mutex<HashMap<u64, NodeHandle>>,
    cut: Mutex<HashSet<u64>>,
    /// Snapshots are held here (as if still being sent) while set.
    hold_snapshots: Mutex<Option<Vec<HeldSnapshot>>>,
}

/// A snapshot message on its way: its sender, the message and the backend file standing for it.
struct HeldSnapshot {
    from: u64,
    msg: Message,
    file: PathBuf,
}

impl Net {
    /// Hands a snapshot to its destination and reports the outcome to its sender.
    fn deliver_snapshot(&self, s: HeldSnapshot) {
        let (dest, me) = {
            let h = self.handles.lock();
            (h.get(&s.msg.to).cloned(), h.get(&s.from).cloned())
        };
        let to = s.msg.to;
        let ok = dest.is_some_and(|d| d.install_snapshot(s.msg, s.file).is_ok());
        if let Some(me) = me {
            me.report_snapshot(to, ok);
        }
    }

    /// Holds the snapshots sent from now on, as if each took long to send.
    fn hold_snapshots(&self) {
        *self.hold_snapshots.lock() = Some(Vec::new());
    }

    /// Sends the held snapshots; later ones go at once again. Returns how many were held.
    fn release_snapshots(&self) -> usize {
        let held = self.hold_snapshots.lock().take().unwrap_or_default();
        let n = held.len();
        for s in held {
            self.deliver_snapshot(s);
        }
        n
    }
}

/// One member's side of the network. Snapshots go as the real transport sends them: the raft
/// message with a file standing for the leader's backend (empty: the state travels in the
/// snapshot's data here), then the outcome reported to the sender's raft.
struct Link {
    from: u64,
    net: Arc<Net>,
    dir: PathBuf,
    sent_snapshots: u64,
}

impl Transport for Link {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let (dest, me) = {
                let h = self.net.handles.lock();
                (h.get(&to).cloned(), h.get(&self.from).cloned())
            };
            let cut = {
                let c = self.net.cut.lock();
                c.contains(&self.from) || c.contains(&to)
            };
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let (Some(dest), false) = (dest, cut) else {
                if let (true, Some(me)) = (snapshot, me) {
                    me.report_snapshot(to, false);
                }
                continue;
            };
            if snapshot {
                self.sent_snapshots += 1;
                let f = self.dir.join(format!("from-{}-to-{}-{}.db", self.from, to, self.sent_snapshots));
                std::fs::write(&f, b"").unwrap();
                let s = HeldSnapshot { from: self.from, msg: m, file: f };
                let s = match &mut *self.net.hold_snapshots.lock() {
                    Some(held) => {
                        held.push(s);
                        continue;
                    }
                    None => s,
                };
                self.net.deliver_snapshot(s);
            } else {
                let _ = dest.step(m);
            }
        }
    }
}

struct Member {
    handle: NodeHandle,
    status: Arc<NodeStatus>,
    machine: Machine,
    join: Option<std::thread::JoinHandle<Result<(), String>>>,
}

struct Cluster {
    net: Arc<Net>,
    members: HashMap<u64, Member>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A new cluster of members 1..=n.
    fn new(n: u64, snapshot_count: u64, catchup_entries: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(Net::default());
        let voters: Vec<u64> = (1..=n).collect();
        let bootstrap: Vec<(u64, Vec<u8>)> = voters.iter().map(|id| (*id, Vec::new())).collect();
        let mut members = HashMap::new();
        for id in 1..=n {
            let root = dir.path().join(format!("m{id}"));
            let (wal, snap) = (root.join("wal"), root.join("snap"));
            std::fs::create_dir_all(&snap).unwrap();
            let identity = Identity { cluster_id: 7, member_id: id, initial_voters: voters.clone() };
            let disk = Disk::open(&wal, &snap, identity, &bootstrap).unwrap();
            let cfg = NodeConfig {
                id,
                tick: Duration::from_millis(10),
                election_ticks: ELECTION_TICKS,
                snapshot_count,
                catchup_entries,
                apply_queue: 4,
                manual_ticks: true,
                // Every applied entry past the trim leaves memory: catching up reads the WAL.
                log_memory_bytes: 0,
            };
            let machine = Machine::default();
            let status = Arc::new(NodeStatus::default());
            let link = Link { from: id, net: net.clone(), dir: root.clone(), sent_snapshots: 0 };
            let (handle, join) = start(cfg, disk, machine.clone(), link, status.clone()).unwrap();
            net.handles.lock().insert(id, handle.clone());
            members.insert(id, Member { handle, status, machine, join: Some(join) });
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Cluster { net, members, rt, _dir: dir }
    }

    fn member(&self, id: u64) -> &Member {
        &self.members[&id]
    }

    /// One tick for every running member, then a moment for the messages it causes to travel
    /// (the rounds bound a wait; the pause only paces them).
    /// One tick on every running member, in lockstep: it returns once each has taken the tick
    /// and handed the messages it produced (heartbeats, votes) to the network, so a loaded
    /// machine cannot let followers run through ticks while the leader's heartbeats wait.
    fn tick(&self) {
        let mut want = Vec::new();
        for m in self.members.values() {
            if !m.status.stopped() {
                want.push((m, m.status.ticks() + 1));
                m.handle.tick();
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for (m, n) in want {
            while m.status.ticks() < n && !m.status.stopped() {
                assert!(std::time::Instant::now() < deadline, "a member's raft loop did not take a tick within 60 s");
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Ticks until `done` holds; fails after [`MAX_ROUNDS`] rounds.
    fn until(&self, what: &str, mut done: impl FnMut(&Cluster) -> bool) {
        for _ in 0..MAX_ROUNDS {
            if done(self) {
                return;
            }
            self.tick();
        }
        panic!("not reached in {MAX_ROUNDS} ticks: {what}");
    }

    /// Proposes the membership change `cc` through member `via` until `done` holds. Raft drops a
    /// proposal without a word in some moments (a new leader takes a configuration change only
    /// once it has applied its own log), and etcd's clients retry: so does this, every
    /// [`RETRY_ROUNDS`] ticks.
    fn change_until(&self, via: u64, cc: keel_raft::wire::MemberChange, what: &str, mut done: impl FnMut(&Cluster) -> bool) {
        for round in 0..MAX_ROUNDS {
            if round % RETRY_ROUNDS == 0 {
                let _ = self.rt.block_on(self.member(via).handle.propose_conf_change(cc.clone()));
            }
            if done(self) {
                return;
            }
            self.tick();
        }
        panic!("not reached in {MAX_ROUNDS} ticks: {what}");
    }

    /// The leader every running member agrees on.
    fn leader(&self) -> u64 {
        let mut id = 0;
        self.until("one leader all running members agree on", |c| {
            let running: Vec<&Member> = c.members.values().filter(|m| !m.status.stopped()).collect();
            let l = running.first().map_or(0, |m| m.status.leader());
            id = l;
            l != 0 && running.iter().all(|m| m.status.leader() == l) && c.members.get(&l).is_some_and(|m| m.status.is_leader())
        });
        id
    }

    /// The leader of a cluster of three, a follower, and the two others than that follower.
    fn leader_follower_others(&self) -> (u64, u64, Vec<u64>) {
        let leader = self.leader();
        let follower = (1..=3).find(|id| *id != leader).unwrap_or(0);
        (leader, follower, (1..=3).filter(|id| *id != follower).collect())
    }

    fn cut(&self, id: u64) {
        self.net.cut.lock().insert(id);
    }

    fn heal(&self, id: u64) {
        self.net.cut.lock().remove(&id);
    }

    fn propose(&self, via: u64, data: Vec<u8>) -> Result<(), ProposeError> {
        self.rt.block_on(self.member(via).handle.propose(data)).map(drop)
    }

    /// Proposes `n` entries `prefix-i` through the leader, re-finding it if leadership moves.
    fn write(&self, prefix: &str, n: usize) {
        let mut leader = self.leader();
        for i in 0..n {
            loop {
                match self.propose(leader, format!("{prefix}-{i}").into_bytes()) {
                    Ok(()) => break,
                    Err(_) => leader = self.leader(),
                }
            }
        }
    }

    /// Waits until every listed member applied `want` data entries, then checks they agree.
    fn converge(&self, ids: &[u64], want: usize) -> Vec<Vec<u8>> {
        self.until("every member applied the same entries", |c| ids.iter().all(|id| c.member(*id).machine.data().len() >= want));
        let first = self.member(ids[0]).machine.data();
        for id in ids {
            assert_eq!(self.member(*id).machine.data(), first, "member {id} applied another sequence");
        }
        first
    }

    /// Stops member `id` and waits for its thread (ticking the others meanwhile).
    fn stop(&mut self, id: u64) {
        self.member(id).handle.stop();
        self.until("the member's thread ended", |c| c.member(id).join.as_ref().is_some_and(|j| j.is_finished()));
        let join = self.members.get_mut(&id).and_then(|m| m.join.take()).unwrap();
        join.join().expect("node thread panicked").expect("node stopped with an error");
        self.net.handles.lock().remove(&id);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.members.values() {
            m.machine.hold(false);
            m.handle.stop();
        }
        for m in self.members.values_mut() {
            if let Some(j) = m.join.take() {
                for _ in 0..MAX_ROUNDS {
                    if j.is_finished() {
                        break;
                    }
                    for o in self.net.handles.lock().values() {
                        o.tick();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                if j.is_finished() {
                    let _ = j.join();
                }
            }
        }
    }
}

fn expected(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{prefix}-{i}").into_bytes()).collect()
}

#[test]
fn three_members_elect_one_leader_and_apply_the_same_log_in_order() {
    let c = Cluster::new(3, 10_000, 100);
    let leader = c.leader();
    assert!((1..=3).contains(&leader));
    c.write("a", 50);
    assert_eq!(c.converge(&[1, 2, 3], 50), expected("a", 50));
    // A proposal through a follower reaches the leader and is applied everywhere too.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    c.propose(follower, b"via-follower".to_vec()).unwrap();
    let all = c.converge(&[1, 2, 3], 51);
    assert_eq!(all.last().map(Vec::as_slice), Some(&b"via-follower"[..]));
}

#[test]
fn a_member_cut_off_past_the_kept_log_catches_up_by_snapshot() {
    let c = Cluster::new(3, 20, 5);
    let (_, behind, others) = c.leader_follower_others();
    c.cut(behind);
    c.write("b", 120);
    c.converge(&others, 120);
    assert_eq!(c.member(behind).machine.with(|a| a.restores), 0);
    // Not heard from for over an election timeout: the leader keeps no entries for it (heard
    // from more recently, and still probing, it would; without ticks it counts as heard).
    for _ in 0..2 * ELECTION_TICKS {
        c.tick();
    }
    c.heal(behind);
    assert_eq!(c.converge(&[1, 2, 3], 120), expected("b", 120));
    assert!(c.member(behind).machine.with(|a| a.restores) >= 1, "caught up by a snapshot, not by entries");
    // No backend file is left behind by the install.
    c.write("c", 5);
    c.converge(&[1, 2, 3], 125);
}

/// The in-memory log is compacted every 100 applied entries to the last `catchup_entries`
/// (etcd 3.7), not only at disk snapshots: with no disk snapshot in sight, a member behind by
/// more than the catch-up entries gets a snapshot, and one behind by fewer gets entries.
#[test]
fn the_in_memory_log_keeps_the_catch_up_entries_between_disk_snapshots() {
    let c = Cluster::new(3, 1_000_000, 150);
    let (_, behind, others) = c.leader_follower_others();
    // Behind by 120 entries, fewer than the 150 kept: caught up by entries.
    c.cut(behind);
    c.write("a", 120);
    c.converge(&others, 120);
    c.heal(behind);
    assert_eq!(c.converge(&[1, 2, 3], 120), expected("a", 120));
    assert_eq!(c.member(behind).machine.with(|a| a.restores), 0, "caught up by entries");
    // Behind by 400 entries: the leader kept only the last 150-250, so a snapshot.
    c.cut(behind);
    c.write("b", 400);
    c.converge(&others, 520);
    c.heal(behind);
    c.converge(&[1, 2, 3], 520);
    assert!(c.member(behind).machine.with(|a| a.restores) >= 1, "caught up by a snapshot, not by entries");
}

/// With no memory for entries' data (`log_memory_bytes: 0`), the applied entries kept for
/// followers are held only as their place in the WAL: a member behind by fewer than the
/// catch-up entries still catches up by entries, read back from the leader's WAL, and a
/// snapshot meanwhile keeps the WAL segments holding them.
#[test]
fn a_member_behind_catches_up_by_entries_read_back_from_the_wal() {
    let c = Cluster::new(3, 60, 150);
    let (leader, behind, others) = c.leader_follower_others();
    c.write("a", 10);
    c.converge(&[1, 2, 3], 10);
    c.cut(behind);
    c.write("b", 120);
    c.converge(&others, 130);
    // A turn of the leader's loop after the last entry applied (the log is trimmed there).
    c.tick();
    let st = &c.member(leader).status;
    let needed = c.member(behind).status.applied() + 1;
    assert!(st.log_first_index() <= needed, "the leader still holds entry {needed} (from {})", st.log_first_index());
    assert!(st.log_memory_first_index() > needed, "entry {needed} is not in memory (from {})", st.log_memory_first_index());
    c.heal(behind);
    assert_eq!(c.converge(&[1, 2, 3], 130)[10..], expected("b", 120)[..]);
    assert_eq!(c.member(behind).machine.with(|a| a.restores), 0, "caught up by entries, not by a snapshot");
}

/// Every member trims its in-memory log, followers too: a follower's own records of its peers'
/// progress (left from its last election) must not hold it (found at 5 GB: followers kept every
/// entry since the election, 7.6 GB).
#[test]
fn followers_trim_their_in_memory_log_as_the_leader_does() {
    let c = Cluster::new(3, 1_000_000, 150);
    c.write("a", 600);
    c.converge(&[1, 2, 3], 600);
    // A turn of every raft loop after the last entry applied (the trim runs in that loop).
    for _ in 0..3 {
        c.tick();
    }
    for id in 1..=3 {
        let first = c.member(id).status.log_first_index();
        // Trimmed every 100 applied entries to the last 150: at least from entry 600 - 250.
        assert!(first > 350, "member {id} (leader {}) holds its log from entry {first}", c.leader());
    }
}

/// A follower cut off while 200 entries are written, healed, and sent a snapshot the network
/// holds while 300 more come (six disk snapshots' worth); returns (leader, follower, the others).
fn snapshot_on_its_way(c: &Cluster) -> (u64, u64, Vec<u64>) {
    let (leader, behind, others) = c.leader_follower_others();
    c.cut(behind);
    c.write("a", 200);
    c.converge(&others, 200);
    // Not heard from for over an election timeout: the leader lets its entries go.
    for _ in 0..2 * ELECTION_TICKS {
        c.tick();
    }
    c.net.hold_snapshots();
    c.heal(behind);
    c.until("the leader sends a snapshot", |c| !c.net.hold_snapshots.lock().as_ref().is_none_or(|h| h.is_empty()));
    c.write("b", 300);
    c.converge(&others, 500);
    (leader, behind, others)
}

/// A snapshot that takes long to send: the leader keeps the entries after it however many disk
/// snapshots it takes meanwhile (etcd pauses its compaction likewise), so the follower catches
/// up by entries once it has installed it instead of needing another snapshot, and another.
#[test]
fn the_entries_after_a_snapshot_being_sent_are_kept_until_it_is_sent() {
    let c = Cluster::new(3, 50, 20);
    let (_, behind, _) = snapshot_on_its_way(&c);
    // Check-quorum rounds pass while it is on its way (each clears raft's own idea of who is
    // active until the next answer): the entries stay all the same.
    for _ in 0..3 * ELECTION_TICKS {
        c.tick();
    }
    assert_eq!(c.net.release_snapshots(), 1);
    assert_eq!(c.converge(&[1, 2, 3], 500).len(), 500);
    assert_eq!(c.member(behind).machine.with(|a| a.restores), 1, "one snapshot, then entries");
}

/// A follower installing a big snapshot answers nothing for seconds (its raft thread waits for
/// the restore), so the leader finds it inactive: the entries written while the snapshot was on
/// its way (more than the catch-up entries) must still be kept until it answers, or it needs
/// another snapshot, and another (found at 5 GB).
#[test]
fn a_follower_silent_while_installing_a_snapshot_still_catches_up_by_entries() {
    let c = Cluster::new(3, 50, 20);
    let (leader, behind, others) = snapshot_on_its_way(&c);
    // Installed and reported sent, but the follower's answers are lost for several election
    // timeouts while more entries come and the leader compacts.
    c.cut(behind);
    assert_eq!(c.net.release_snapshots(), 1);
    for _ in 0..3 * ELECTION_TICKS {
        c.tick();
    }
    // (Through the leader: the silent follower no longer agrees on one.)
    for i in 0..150 {
        c.propose(leader, format!("c-{i}").into_bytes()).expect("the leader takes the write");
    }
    c.converge(&others, 650);
    for _ in 0..3 * ELECTION_TICKS {
        c.tick();
    }
    c.heal(behind);
    assert_eq!(c.converge(&[1, 2, 3], 650).len(), 650);
    assert_eq!(c.member(behind).machine.with(|a| a.restores), 1, "one snapshot, then entries");
}

#[test]
fn a_read_on_a_member_cut_off_expires_and_a_reissued_one_is_served_after_healing() {
    let c = Cluster::new(3, 10_000, 100);
    let leader = c.leader();
    c.write("r", 3);
    c.converge(&[1, 2, 3], 3);
    // On the leader, cut off: no quorum confirms it, so the read fails after two election
    // timeouts of ticks instead of waiting forever.
    c.cut(leader);
    let rx = {
        let h = c.member(leader).handle.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        c.rt.spawn(async move {
            let _ = tx.send(h.read_index().await);
        });
        rx
    };
    let mut answer = None;
    c.until("the cut-off read is answered", |c| {
        c.rt.block_on(tokio::task::yield_now());
        answer = rx.try_recv().ok();
        answer.is_some()
    });
    assert_eq!(answer, Some(Err(ProposeError::Timeout)));
    c.heal(leader);
    let leader = c.leader();
    // On a follower cut off for a few ticks (less than the expiry): its ReadIndex request to
    // the leader is lost, and raft does not resend it; the node re-issues it, and once healed
    // the read is served at an index at least the commit index when it was issued.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    c.cut(follower);
    let committed = c.member(leader).status.commit();
    let rx = {
        let h = c.member(follower).handle.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        c.rt.spawn(async move {
            let _ = tx.send(h.read_index().await);
        });
        rx
    };
    for _ in 0..ELECTION_TICKS / 2 {
        c.rt.block_on(tokio::task::yield_now());
        c.tick();
    }
    c.heal(follower);
    let mut answer = None;
    c.until("the re-issued read is answered", |c| {
        c.rt.block_on(tokio::task::yield_now());
        answer = rx.try_recv().ok();
        answer.is_some()
    });
    let index = answer.unwrap().expect("the read is served once the follower is back");
    assert!(index >= committed, "read index {index} below the commit index {committed} it started after");
}

#[test]
fn a_stopping_leader_hands_leadership_to_another_member_and_nothing_is_lost() {
    let mut c = Cluster::new(3, 10_000, 100);
    let old = c.leader();
    let term = c.member(old).status.term();
    c.write("s", 20);
    c.stop(old);
    let new = c.leader();
    assert_ne!(new, old);
    assert!(c.member(new).status.term() > term);
    let rest: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    c.write("t", 5);
    let all = c.converge(&rest, 25);
    assert_eq!(&all[..20], &expected("s", 20)[..]);
    assert_eq!(c.member(old).machine.data(), expected("s", 20), "the stopped member applied everything it acknowledged");
}

#[test]
fn a_leader_whose_apply_lags_refuses_proposals_until_it_catches_up() {
    let c = Cluster::new(3, 100_000, 100);
    let leader = c.leader();
    // The leader's state machine stalls (a slow disk); the log is committed by the quorum
    // regardless, until the gap between commit and apply passes etcd's 5,000 entries.
    c.member(leader).machine.hold(true);
    let mut refused = None;
    for i in 0..20_000 {
        match c.propose(leader, format!("g-{i}").into_bytes()) {
            Ok(()) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
        if i % 64 == 0 {
            c.tick();
        }
    }
    let (at, e) = refused.expect("proposals are refused once the apply falls behind");
    assert_eq!(e, ProposeError::Busy);
    assert!(at >= 5_000, "refused after {at} entries only");
    // Priority proposals (lease revocations under etcd 3.7's PriorityRequest) are still taken,
    // until the gap is twice as large.
    let mut refused = None;
    for i in 0..20_000 {
        match c.rt.block_on(c.member(leader).handle.propose_with(format!("p-{i}").into_bytes(), true)) {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
        if i % 64 == 0 {
            c.tick();
        }
    }
    let (more, e) = refused.expect("priority proposals are refused past twice the gap");
    assert_eq!(e, ProposeError::Busy);
    assert!(more > 0 && at + more >= 10_000, "priority proposals refused after {at} + {more} entries");
    let at = at + more;
    // Raft itself goes on: the leader still leads, ticks and heartbeats reach the followers.
    for _ in 0..3 * ELECTION_TICKS {
        c.tick();
    }
    assert!(c.member(leader).status.is_leader(), "the stalled apply did not stop the raft loop");
    c.member(leader).machine.hold(false);
    c.until("the leader's apply caught up", |c| c.member(leader).status.applied() >= c.member(leader).status.commit());
    c.propose(leader, b"after".to_vec()).unwrap();
    let all = c.converge(&[1, 2, 3], at + 1);
    assert_eq!(all.last().map(Vec::as_slice), Some(&b"after"[..]));
}

#[test]
fn membership_changes_in_etcds_encoding_commit_via_leader_and_follower() {
    use keel_raft::wire::{ChangeKind, MemberChange};
    let c = Cluster::new(3, 100_000, 100);
    let leader = c.leader();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let change = |id: u64, kind: ChangeKind, node_id: u64| MemberChange {
        id,
        kind,
        node_id,
        context: format!("{{\"id\":{node_id},\"peerURLs\":[\"http://127.0.0.1:1\"]}}").into_bytes().into(),
    };
    let conf_has = |c: &Cluster, learner: u64| {
        c.members.values().all(|m| m.machine.with(|a| a.conf.as_ref().is_some_and(|cs| cs.learners.contains(&learner))))
    };
    let applied_past = |c: &Cluster, index: u64| c.members.values().all(|m| m.machine.with(|a| a.index) > index);
    // etcd numbers a learner add 3, which raft-rs's own parser refuses: it goes in through the
    // leader, and every member applies it.
    c.change_until(leader, change(107, ChangeKind::AddLearnerNode, 7), "every member has learner 7", |c| conf_has(c, 7));
    // An update (etcd's 2) commits and leaves the configuration as it is.
    let before = c.member(leader).status.commit();
    c.change_until(leader, change(200, ChangeKind::UpdateNode, 7), "the update is applied everywhere", |c| applied_past(c, before));
    assert!(conf_has(&c, 7));
    // A second learner is refused as etcd refuses it (one at most): it commits as no change.
    let before = c.member(leader).status.commit();
    c.change_until(leader, change(108, ChangeKind::AddLearnerNode, 8), "the refused add is applied everywhere", |c| {
        applied_past(c, before)
    });
    assert!(!conf_has(&c, 8) && conf_has(&c, 7));
    // Through a follower (forwarded): the learner's removal, then another learner's add.
    c.change_until(follower, change(300, ChangeKind::RemoveNode, 7), "learner 7 is gone everywhere", |c| {
        c.members.values().all(|m| m.machine.with(|a| a.conf.as_ref().is_some_and(|cs| !cs.learners.contains(&7))))
    });
    // A removed ID cannot come back (etcd's removed-member check, at apply on every member):
    // the re-add commits as no change.
    let before = c.member(leader).status.commit();
    c.change_until(leader, change(301, ChangeKind::AddLearnerNode, 7), "the refused re-add is applied everywhere", |c| {
        applied_past(c, before)
    });
    assert!(!conf_has(&c, 7), "removed member 7 was added again");
    c.change_until(follower, change(308, ChangeKind::AddLearnerNode, 8), "every member has learner 8", |c| conf_has(c, 8));
}

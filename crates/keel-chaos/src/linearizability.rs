//! Linearizability of a KV history against a model of etcd's KV.
//!
//! Two parts:
//! - **Per key, exhaustive**: a Wing–Gong–Lowe search (as porcupine does: a linked list of call
//!   and return events, a stack of linearized calls, a cache of (linearized set, state) pairs)
//!   for each key's operations against a one-key model of etcd: value, version, create and mod
//!   revision, lease, and the compare semantics of etcd's Txn. Every operation in the workload
//!   touches one key, so the history partitions by key (P-compositionality).
//! - **Across keys, by revision**: what the global revision adds: revisions of writes are unique,
//!   and they (and the revisions of reads) respect real time: anything that completed before
//!   another operation was invoked carries a revision no newer than it.
//!
//! Operations with an unknown outcome complete at [`NEVER`]: they may take effect at any point
//! after their invocation, or never. Pure reads that failed are left out (they change nothing).

use crate::history::{Cmp, History, Input, Kv, Op, Output, Time, NEVER};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The model's state for one key. `None` revisions are not known yet (written by an operation
/// with an unknown outcome); a later read pins them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyState {
    pub kv: Option<ModelKv>,
    /// Lower bound of the key's last modification revision.
    pub last_rev: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelKv {
    pub value: String,
    pub mod_rev: Option<i64>,
    pub create_rev: Option<i64>,
    pub version: i64,
    pub lease: i64,
}

impl KeyState {
    pub fn empty() -> KeyState {
        KeyState { kv: None, last_rev: 0 }
    }

    fn put(&self, value: &str, lease: i64, rev: Option<i64>) -> KeyState {
        let (create_rev, version) = match &self.kv {
            Some(k) => (k.create_rev, k.version + 1),
            None => (rev, 1),
        };
        KeyState {
            kv: Some(ModelKv { value: value.to_string(), mod_rev: rev, create_rev, version, lease }),
            last_rev: rev.unwrap_or(self.last_rev),
        }
    }

    /// The state after a read returned `got` at header revision `rev`, if the read is possible.
    fn read(&self, got: &Option<Kv>, rev: i64) -> Option<KeyState> {
        match (&self.kv, got) {
            (None, None) => (rev >= self.last_rev).then(|| self.clone()),
            (Some(m), Some(k)) => {
                if m.value != k.value || m.version != k.version || m.lease != k.lease || rev < k.mod_rev {
                    return None;
                }
                let mut next = self.clone();
                let nk = next.kv.as_mut()?;
                match m.mod_rev {
                    Some(r) if r != k.mod_rev => return None,
                    Some(_) => {}
                    None => {
                        if k.mod_rev <= self.last_rev {
                            return None;
                        }
                        nk.mod_rev = Some(k.mod_rev);
                        next.last_rev = k.mod_rev;
                    }
                }
                match m.create_rev {
                    Some(c) if c != k.create_rev => return None,
                    Some(_) => {}
                    None => {
                        if k.create_rev > k.mod_rev {
                            return None;
                        }
                        nk.create_rev = Some(k.create_rev);
                    }
                }
                Some(next)
            }
            _ => None,
        }
    }

    fn cmp_holds(&self, cmp: &Cmp) -> bool {
        match cmp {
            Cmp::Value(v) => self.kv.as_ref().is_some_and(|k| &k.value == v),
            Cmp::Absent => self.kv.is_none(),
        }
    }

    /// etcd's semantics for one operation: the next state, or None if `output` is impossible here.
    pub fn step(&self, input: &Input, output: &Output) -> Option<KeyState> {
        match (input, output) {
            (Input::Put { value, lease }, Output::Put { rev }) => (*rev > self.last_rev).then(|| self.put(value, *lease, Some(*rev))),
            (Input::Put { value, lease }, Output::Unknown) => Some(self.put(value, *lease, None)),
            (Input::Get, Output::Get { kv, rev }) => self.read(kv, *rev),
            (Input::Get, Output::Unknown) => Some(self.clone()),
            (Input::Delete, Output::Delete { deleted, rev }) => match self.kv {
                Some(_) => (*deleted == 1 && *rev > self.last_rev).then_some(KeyState { kv: None, last_rev: *rev }),
                None => (*deleted == 0 && *rev >= self.last_rev).then(|| self.clone()),
            },
            (Input::Delete, Output::Unknown) => Some(KeyState { kv: None, last_rev: self.last_rev }),
            (Input::Txn { cmp, value }, Output::Txn { succeeded, rev, kv }) => {
                if self.cmp_holds(cmp) != *succeeded {
                    return None;
                }
                if *succeeded {
                    (*rev > self.last_rev).then(|| self.put(value, 0, Some(*rev)))
                } else {
                    self.read(kv, *rev)
                }
            }
            (Input::Txn { cmp, value }, Output::Unknown) => Some(if self.cmp_holds(cmp) { self.put(value, 0, None) } else { self.clone() }),
            (Input::Revoke { lease }, Output::Revoke { rev }) => match &self.kv {
                Some(k) if k.lease == *lease => (*rev > self.last_rev).then_some(KeyState { kv: None, last_rev: *rev }),
                _ => (*rev >= self.last_rev).then(|| self.clone()),
            },
            (Input::Revoke { lease }, Output::Unknown) => match &self.kv {
                Some(k) if k.lease == *lease => Some(KeyState { kv: None, last_rev: self.last_rev }),
                _ => Some(self.clone()),
            },
            _ => None,
        }
    }
}

/// Why a key's history is not linearizable: the longest prefix that could be linearized and the
/// operations that were pending right after it (the smallest failing window the search saw).
#[derive(Debug)]
pub struct KeyFailure {
    pub key: String,
    /// Operations (ids) in the longest linearization found, in order.
    pub longest: Vec<usize>,
    /// State after that linearization.
    pub state: KeyState,
    /// Operations none of which could go next: every call pending at the first return the
    /// search could not pass.
    pub stuck: Vec<usize>,
}

#[derive(Debug)]
pub enum Verdict {
    Ok,
    Violation(KeyFailure),
    /// The search gave up after its step budget (neither proven nor refuted).
    Inconclusive {
        key: String,
        ops: usize,
    },
}

#[derive(Clone, Copy)]
enum Ev {
    Call(usize),
    Ret(usize),
}

/// Checks one key's operations (indexes into `ops`), all on the same key.
pub fn check_key(key: &str, ops: &[&Op], budget: u64) -> Verdict {
    let n = ops.len();
    if n == 0 {
        return Verdict::Ok;
    }
    // Events sorted by time; a call sorts before a return at the same instant (the more
    // permissive reading: the operations overlap).
    let mut evs: Vec<(Time, u8, Ev)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        evs.push((op.call, 0, Ev::Call(i)));
        evs.push((if op.ret == NEVER { NEVER } else { op.ret }, 1, Ev::Ret(i)));
    }
    evs.sort_by_key(|e| (e.0, e.1));
    // Doubly linked list over event slots; slot 0 is the head sentinel.
    let len = evs.len() + 1;
    let mut next: Vec<usize> = (1..=len).collect();
    let mut prev: Vec<usize> = (0..len).map(|i| i.wrapping_sub(1)).collect();
    next[len - 1] = usize::MAX;
    let ev_at = |slot: usize| evs[slot - 1].2;
    let mut ret_slot = vec![0usize; n];
    for (s, e) in evs.iter().enumerate() {
        if let Ev::Ret(i) = e.2 {
            ret_slot[i] = s + 1;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, s: usize| {
        let (p, nx) = (prev[s], next[s]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, s: usize| {
        let (p, nx) = (prev[s], next[s]);
        next[p] = s;
        if nx != usize::MAX {
            prev[nx] = s;
        }
    };
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, KeyState)> = HashSet::new();
    let mut stack: Vec<(usize, KeyState)> = Vec::new();
    let mut state = KeyState::empty();
    let mut longest: Vec<usize> = Vec::new();
    let mut longest_state = state.clone();
    let mut stuck: Vec<usize> = Vec::new();
    let mut entry = next[0];
    let mut steps = 0u64;
    loop {
        if next[0] == usize::MAX {
            return Verdict::Ok;
        }
        steps += 1;
        if steps > budget {
            return Verdict::Inconclusive { key: key.to_string(), ops: n };
        }
        if entry == usize::MAX {
            // Cannot happen: a return is always reached before the end of the list.
            return Verdict::Inconclusive { key: key.to_string(), ops: n };
        }
        match ev_at(entry) {
            Ev::Call(i) => {
                let op = ops[i];
                let mut advanced = false;
                if let Some(ns) = state.step(&op.input, &op.output) {
                    let mut bits = linearized.clone();
                    bits[i / 64] |= 1 << (i % 64);
                    if cache.insert((bits.clone(), ns.clone())) {
                        stack.push((entry, state));
                        state = ns;
                        linearized = bits;
                        unlink(&mut next, &mut prev, entry);
                        unlink(&mut next, &mut prev, ret_slot[i]);
                        if stack.len() > longest.len() {
                            longest = stack
                                .iter()
                                .map(|(s, _)| match ev_at(*s) {
                                    Ev::Call(j) => j,
                                    Ev::Ret(j) => j,
                                })
                                .collect();
                            longest_state = state.clone();
                        }
                        entry = next[0];
                        advanced = true;
                    }
                }
                if !advanced {
                    entry = next[entry];
                }
            }
            Ev::Ret(_) => {
                if stack.len() == longest.len() && stuck.is_empty() {
                    // The first dead end at the deepest point: what was pending there.
                    let mut s = next[0];
                    while s != usize::MAX && s != entry {
                        if let Ev::Call(j) = ev_at(s) {
                            stuck.push(j);
                        }
                        s = next[s];
                    }
                    if let Ev::Ret(j) = ev_at(entry) {
                        if !stuck.contains(&j) {
                            stuck.push(j);
                        }
                    }
                }
                let Some((call, st)) = stack.pop() else {
                    return Verdict::Violation(KeyFailure {
                        key: key.to_string(),
                        longest: longest.iter().map(|&j| ops[j].id).collect(),
                        state: longest_state,
                        stuck: stuck.iter().map(|&j| ops[j].id).collect(),
                    });
                };
                let Ev::Call(i) = ev_at(call) else { unreachable!("the stack holds calls") };
                state = st;
                linearized[i / 64] &= !(1 << (i % 64));
                relink(&mut next, &mut prev, ret_slot[i]);
                relink(&mut next, &mut prev, call);
                entry = next[call];
            }
        }
    }
}

/// Problems found by the revision checks across keys.
pub fn check_revisions(h: &History) -> Vec<String> {
    let mut problems = Vec::new();
    // Unique write revisions.
    let mut by_rev: HashMap<i64, usize> = HashMap::new();
    for op in &h.ops {
        if let Some(r) = op.write_rev() {
            if let Some(other) = by_rev.insert(r, op.id) {
                problems.push(format!("ops {other} and {} both wrote revision {r}", op.id));
            }
        }
    }
    // Real time: an operation that completed before another was invoked has a revision no newer
    // than the other's; strictly older when the later one wrote. Sweep by time keeping the
    // highest revision completed so far.
    let mut events: Vec<(Time, u8, &Op)> = Vec::new();
    for op in &h.ops {
        if op.header_rev().is_none() {
            continue;
        }
        events.push((op.call, 1, op));
        events.push((op.ret, 0, op));
    }
    // At equal times a call sorts after a return: only operations that certainly completed
    // earlier constrain a later one.
    events.sort_by_key(|e| (e.0, e.1));
    let mut done_max: Option<(i64, usize)> = None;
    for (_, kind, op) in &events {
        let Some(rev) = op.header_rev() else { continue };
        if *kind == 0 {
            if done_max.is_none_or(|(r, _)| rev > r) {
                done_max = Some((rev, op.id));
            }
        } else if let Some((r, id)) = done_max {
            let ok = if op.write_rev().is_some() { rev > r } else { rev >= r };
            if !ok {
                problems.push(format!(
                    "op {} (invoked at {} ns) returned revision {rev}, older than revision {r} of op {id}, which had completed before it was invoked",
                    op.id, op.call
                ));
            }
        }
    }
    // Per client, revisions never go backwards (each client waits for each response).
    let mut per_client: BTreeMap<usize, (i64, usize)> = BTreeMap::new();
    let mut sorted: Vec<&Op> = h.ops.iter().filter(|o| o.header_rev().is_some()).collect();
    sorted.sort_by_key(|o| o.call);
    for op in sorted {
        let rev = op.header_rev().unwrap_or(0);
        if let Some((last, id)) = per_client.get(&op.client) {
            if rev < *last {
                problems.push(format!("client {}: revision went back from {last} (op {id}) to {rev} (op {})", op.client, op.id));
            }
        }
        per_client.insert(op.client, (rev, op.id));
    }
    problems
}

/// Runs every check on the history's KV operations.
pub fn check(h: &History, budget: u64) -> (Vec<Verdict>, Vec<String>) {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &h.ops {
        if op.input == Input::Get && op.output == Output::Unknown {
            continue;
        }
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let verdicts = by_key.iter().map(|(k, ops)| check_key(k, ops, budget)).filter(|v| !matches!(v, Verdict::Ok)).collect();
    (verdicts, check_revisions(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: usize, input: Input, output: Output, call: Time, ret: Time) -> Op {
        Op { id, client: id, member: 1, key: "k".into(), input, output, call, ret, error: None }
    }
    fn kv(v: &str, m: i64, c: i64, ver: i64) -> Option<Kv> {
        Some(Kv { value: v.into(), mod_rev: m, create_rev: c, version: ver, lease: 0 })
    }
    fn put(v: &str) -> Input {
        Input::Put { value: v.into(), lease: 0 }
    }
    fn run(ops: &[Op]) -> Verdict {
        let refs: Vec<&Op> = ops.iter().collect();
        check_key("k", &refs, 1_000_000)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let ops = vec![
            op(0, put("a"), Output::Put { rev: 2 }, 0, 10),
            op(1, Input::Get, Output::Get { kv: kv("a", 2, 2, 1), rev: 2 }, 20, 30),
            op(2, Input::Txn { cmp: Cmp::Value("a".into()), value: "b".into() }, Output::Txn { succeeded: true, rev: 3, kv: None }, 40, 50),
            op(3, Input::Get, Output::Get { kv: kv("b", 3, 2, 2), rev: 3 }, 60, 70),
            op(4, Input::Delete, Output::Delete { deleted: 1, rev: 4 }, 80, 90),
            op(5, Input::Get, Output::Get { kv: None, rev: 4 }, 100, 110),
        ];
        assert!(matches!(run(&ops), Verdict::Ok));
    }

    #[test]
    fn stale_read_is_caught() {
        let ops = vec![
            op(0, put("a"), Output::Put { rev: 2 }, 0, 10),
            op(1, put("b"), Output::Put { rev: 3 }, 20, 30),
            // Invoked after "b" was acknowledged, yet sees "a".
            op(2, Input::Get, Output::Get { kv: kv("a", 2, 2, 1), rev: 3 }, 40, 50),
        ];
        match run(&ops) {
            Verdict::Violation(f) => {
                assert_eq!(f.longest, vec![0, 1]);
                assert!(f.stuck.contains(&2));
            }
            v => panic!("expected a violation, got {v:?}"),
        }
    }

    #[test]
    fn concurrent_operations_may_go_either_way() {
        let ops = vec![
            op(0, put("a"), Output::Put { rev: 2 }, 0, 100),
            op(1, Input::Get, Output::Get { kv: None, rev: 1 }, 10, 20),
            op(2, Input::Get, Output::Get { kv: kv("a", 2, 2, 1), rev: 2 }, 30, 40),
        ];
        assert!(matches!(run(&ops), Verdict::Ok));
    }

    #[test]
    fn unknown_write_may_or_may_not_happen() {
        let happened = vec![
            op(0, put("a"), Output::Unknown, 0, NEVER),
            op(1, Input::Get, Output::Get { kv: kv("a", 7, 7, 1), rev: 7 }, 10, 20),
            op(2, put("b"), Output::Put { rev: 8 }, 30, 40),
            op(3, Input::Get, Output::Get { kv: kv("b", 8, 7, 2), rev: 8 }, 50, 60),
        ];
        assert!(matches!(run(&happened), Verdict::Ok));
        let not_happened = vec![op(0, put("a"), Output::Unknown, 0, NEVER), op(1, Input::Get, Output::Get { kv: None, rev: 3 }, 10, 20)];
        assert!(matches!(run(&not_happened), Verdict::Ok));
        // But a value nobody wrote cannot appear.
        let invented =
            vec![op(0, put("a"), Output::Unknown, 0, NEVER), op(1, Input::Get, Output::Get { kv: kv("z", 7, 7, 1), rev: 7 }, 10, 20)];
        assert!(matches!(run(&invented), Verdict::Violation(_)));
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        let ops = vec![op(0, put("a"), Output::Put { rev: 2 }, 0, 10), op(1, Input::Get, Output::Get { kv: None, rev: 5 }, 20, 30)];
        assert!(matches!(run(&ops), Verdict::Violation(_)));
    }

    #[test]
    fn txn_compare_semantics() {
        // A value compare on a missing key fails; the else branch reads the (missing) key.
        let ops = vec![op(
            0,
            Input::Txn { cmp: Cmp::Value("x".into()), value: "y".into() },
            Output::Txn { succeeded: false, rev: 1, kv: None },
            0,
            10,
        )];
        assert!(matches!(run(&ops), Verdict::Ok));
        let wrong = vec![op(
            0,
            Input::Txn { cmp: Cmp::Value("x".into()), value: "y".into() },
            Output::Txn { succeeded: true, rev: 2, kv: None },
            0,
            10,
        )];
        assert!(matches!(run(&wrong), Verdict::Violation(_)));
        let absent = vec![
            op(0, Input::Txn { cmp: Cmp::Absent, value: "y".into() }, Output::Txn { succeeded: true, rev: 2, kv: None }, 0, 10),
            op(
                1,
                Input::Txn { cmp: Cmp::Absent, value: "z".into() },
                Output::Txn { succeeded: false, rev: 2, kv: kv("y", 2, 2, 1) },
                20,
                30,
            ),
        ];
        assert!(matches!(run(&absent), Verdict::Ok));
    }

    #[test]
    fn revoke_deletes_only_its_own_lease() {
        let ops = vec![
            op(0, Input::Put { value: "a".into(), lease: 9 }, Output::Put { rev: 2 }, 0, 10),
            op(1, Input::Revoke { lease: 9 }, Output::Revoke { rev: 3 }, 20, 30),
            op(2, Input::Get, Output::Get { kv: None, rev: 3 }, 40, 50),
            op(3, put("b"), Output::Put { rev: 4 }, 60, 70),
            op(4, Input::Revoke { lease: 9 }, Output::Revoke { rev: 4 }, 80, 90),
            op(5, Input::Get, Output::Get { kv: kv("b", 4, 4, 1), rev: 4 }, 100, 110),
        ];
        assert!(matches!(run(&ops), Verdict::Ok));
    }

    #[test]
    fn revisions_must_respect_real_time() {
        let mut h = History::default();
        h.ops.push(Op { key: "a".into(), ..op(0, put("a"), Output::Put { rev: 5 }, 0, 10) });
        h.ops.push(Op { key: "b".into(), ..op(1, put("b"), Output::Put { rev: 4 }, 20, 30) });
        let problems = check_revisions(&h);
        assert!(problems.iter().any(|p| p.contains("older than revision 5")), "{problems:?}");
        h.ops[1].output = Output::Put { rev: 5 };
        assert!(check_revisions(&h).iter().any(|p| p.contains("both wrote revision 5")));
    }

    #[test]
    fn search_is_bounded_by_its_budget() {
        // Many concurrent unknown writes: exponential without the cache; the budget stops it.
        let mut ops: Vec<Op> = (0..40).map(|i| op(i, put(&format!("v{i}")), Output::Unknown, i as u64, NEVER)).collect();
        ops.push(op(40, Input::Get, Output::Get { kv: kv("zz", 100, 100, 1), rev: 100 }, 1000, 1010));
        let refs: Vec<&Op> = ops.iter().collect();
        assert!(matches!(check_key("k", &refs, 10_000), Verdict::Inconclusive { .. }));
    }
}

//! Watch guarantees, checked on what every watcher received (etcd's robustness checks):
//! - ordered and unique: revisions strictly increase from one response to the next, across
//!   resumed streams too;
//! - atomic: a revision's events all arrive in one response, the same events for every watcher;
//! - reliable and resumable: a watcher misses no revision between where it started and the last
//!   one it got, whatever streams it needed;
//! - prev_kv: the previous version of the key, exactly as the history has it;
//! - progress notifications never ahead: nothing at or below a notified revision arrives later,
//!   and everything up to it arrived before;
//! - agreement with the clients: every event was written by a client's operation (no invented
//!   data), every acknowledged write is an event at its revision (no lost write).
//!
//! The reference history is the union of all watchers' events (they must agree), starting at
//! revision 1: watchers start on an empty prefix of a fresh cluster.

use crate::history::{Event, History, Input};
use std::collections::{BTreeMap, HashMap};

pub fn check(h: &History) -> Vec<String> {
    let mut problems = Vec::new();
    // Reference: revision -> events (as the first watcher to deliver it saw them).
    let mut reference: BTreeMap<i64, (usize, Vec<Event>)> = BTreeMap::new();
    let mut per_watcher: BTreeMap<usize, Vec<&crate::history::WatchResponse>> = BTreeMap::new();
    for r in &h.watch {
        per_watcher.entry(r.watcher).or_default().push(r);
    }
    for (w, resps) in &per_watcher {
        for r in resps {
            let mut by_rev: BTreeMap<i64, Vec<Event>> = BTreeMap::new();
            for e in &r.events {
                by_rev.entry(e.mod_rev).or_default().push(e.clone());
            }
            for (rev, evs) in by_rev {
                match reference.get(&rev) {
                    None => {
                        reference.insert(rev, (*w, evs));
                    }
                    Some((w0, evs0)) if *evs0 != evs => problems.push(format!(
                        "revision {rev}: watcher {w} got {evs:?}, watcher {w0} got {evs0:?} (not atomic or not the same history)"
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    let max_rev = reference.keys().next_back().copied().unwrap_or(0);

    // Per watcher: order, uniqueness, reliability, progress notifications.
    let compacted: HashMap<usize, bool> = h.watch_starts.iter().filter(|s| s.compacted).map(|s| (s.watcher, true)).collect();
    for (w, resps) in &per_watcher {
        let mut last = 0i64;
        let mut seen: Vec<i64> = Vec::new();
        let mut notified = 0i64;
        for r in resps {
            let mut prev_in_resp = 0i64;
            for e in &r.events {
                if e.mod_rev <= last {
                    problems.push(format!(
                        "watcher {w}: event at revision {} (key {}) after revision {last} (out of order or duplicate; stream {})",
                        e.mod_rev, e.key, r.stream
                    ));
                }
                if e.mod_rev <= notified {
                    problems.push(format!("watcher {w}: event at revision {} after a progress notification at {notified}", e.mod_rev));
                }
                if e.mod_rev < prev_in_resp {
                    problems.push(format!("watcher {w}: events out of order inside one response at revision {}", e.mod_rev));
                }
                prev_in_resp = e.mod_rev;
                if seen.last() != Some(&e.mod_rev) {
                    seen.push(e.mod_rev);
                }
            }
            if let Some(e) = r.events.last() {
                last = last.max(e.mod_rev);
            }
            if r.progress && r.events.is_empty() {
                // Everything up to the notified revision must have arrived already.
                let missing: Vec<i64> =
                    reference.range(1..=r.header_rev).map(|(k, _)| *k).filter(|k| seen.binary_search(k).is_err()).take(5).collect();
                if !missing.is_empty() && !compacted.contains_key(w) {
                    problems.push(format!(
                        "watcher {w}: progress notification at revision {} before events {missing:?} were delivered",
                        r.header_rev
                    ));
                }
                notified = notified.max(r.header_rev);
            }
        }
        if compacted.contains_key(w) {
            continue;
        }
        let missing: Vec<i64> = reference.range(1..=last).map(|(k, _)| *k).filter(|k| seen.binary_search(k).is_err()).collect();
        if !missing.is_empty() {
            problems.push(format!(
                "watcher {w}: missed {} revisions up to {last}, first {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
    }

    // prev_kv and versions against the reference history.
    let mut latest: HashMap<&str, Option<&crate::history::Kv>> = HashMap::new();
    for (rev, (_, evs)) in &reference {
        for e in evs {
            let before = latest.get(e.key.as_str()).copied().flatten();
            if e.prev.as_ref() != before {
                problems.push(format!("revision {rev} key {}: prev_kv {:?}, but the history before it has {before:?}", e.key, e.prev));
            }
            if let Some(kv) = &e.kv {
                let (create, version) = match before {
                    Some(b) => (b.create_rev, b.version + 1),
                    None => (*rev, 1),
                };
                if kv.create_rev != create || kv.version != version || kv.mod_rev != *rev {
                    problems.push(format!(
                        "revision {rev} key {}: kv {kv:?}, expected create_revision {create} version {version} mod_revision {rev}",
                        e.key
                    ));
                }
            }
            latest.insert(e.key.as_str(), e.kv.as_ref());
        }
    }

    // Events against the clients' operations.
    let mut writers: HashMap<(&str, &str), Vec<&crate::history::Op>> = HashMap::new();
    for op in &h.ops {
        if let Some(v) = op.written_value() {
            writers.entry((op.key.as_str(), v)).or_default().push(op);
        }
    }
    let deleters: std::collections::HashSet<&str> =
        h.ops.iter().filter(|o| matches!(o.input, Input::Delete | Input::Revoke { .. })).map(|o| o.key.as_str()).collect();
    let mut event_rev: HashMap<(&str, &str), i64> = HashMap::new();
    for (rev, (_, evs)) in &reference {
        for e in evs {
            if e.kv.is_none() && !deleters.contains(e.key.as_str()) {
                problems.push(format!("revision {rev}: key {} was deleted, but no client deleted it or revoked a lease on it", e.key));
            }
            if let Some(kv) = &e.kv {
                match writers.get(&(e.key.as_str(), kv.value.as_str())) {
                    None => problems.push(format!("revision {rev}: key {} has value {:?}, which no client wrote", e.key, kv.value)),
                    Some(ops) => {
                        for op in ops {
                            if let Some(w) = op.write_rev() {
                                if w != *rev {
                                    problems.push(format!(
                                        "op {} was acknowledged at revision {w} but its value appeared at revision {rev}",
                                        op.id
                                    ));
                                }
                            }
                        }
                    }
                }
                event_rev.insert((e.key.as_str(), kv.value.as_str()), *rev);
            }
        }
    }
    for op in &h.ops {
        let (Some(w), Some(v)) = (op.write_rev(), op.written_value()) else { continue };
        if w <= max_rev && !event_rev.contains_key(&(op.key.as_str(), v)) && h.compacted < w {
            problems.push(format!("op {} ({} = {v:?}) was acknowledged at revision {w}, but no watcher ever saw it", op.id, op.key));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Kv, Op, Output, WatchResponse};

    fn kv(v: &str, m: i64, c: i64, ver: i64) -> Kv {
        Kv { value: v.into(), mod_rev: m, create_rev: c, version: ver, lease: 0 }
    }
    fn resp(watcher: usize, events: Vec<Event>) -> WatchResponse {
        WatchResponse {
            watcher,
            member: 1,
            stream: 0,
            header_rev: events.last().map(|e| e.mod_rev).unwrap_or(0),
            events,
            progress: false,
            at: 0,
        }
    }
    fn put_ev(k: &str, kv: Kv, prev: Option<Kv>) -> Event {
        Event { key: k.into(), mod_rev: kv.mod_rev, kv: Some(kv), prev }
    }
    fn put_op(id: usize, k: &str, v: &str, rev: i64) -> Op {
        Op {
            id,
            client: 0,
            member: 1,
            key: k.into(),
            input: Input::Put { value: v.into(), lease: 0 },
            output: Output::Put { rev },
            call: 0,
            ret: 1,
            error: None,
        }
    }

    fn good() -> History {
        let mut h = History { ops: vec![put_op(0, "a", "x", 2), put_op(1, "a", "y", 3)], ..Default::default() };
        let e1 = put_ev("a", kv("x", 2, 2, 1), None);
        let e2 = put_ev("a", kv("y", 3, 2, 2), Some(kv("x", 2, 2, 1)));
        h.watch = vec![resp(0, vec![e1.clone()]), resp(0, vec![e2.clone()]), resp(1, vec![e1, e2])];
        h
    }

    #[test]
    fn consistent_watchers_pass() {
        assert_eq!(check(&good()), Vec::<String>::new());
    }

    #[test]
    fn duplicate_event_is_caught() {
        let mut h = good();
        let dup = h.watch[0].clone();
        h.watch.insert(1, dup);
        assert!(check(&h).iter().any(|p| p.contains("out of order or duplicate")));
    }

    #[test]
    fn gap_is_caught() {
        let mut h = good();
        h.ops.push(put_op(2, "a", "z", 4));
        h.watch.push(resp(1, vec![put_ev("a", kv("z", 4, 2, 3), Some(kv("y", 3, 2, 2)))]));
        // Watcher 0 jumps from 2 to 4.
        h.watch[1] = resp(0, vec![put_ev("a", kv("z", 4, 2, 3), Some(kv("y", 3, 2, 2)))]);
        assert!(check(&h).iter().any(|p| p.contains("watcher 0: missed 1 revisions")));
    }

    #[test]
    fn wrong_prev_kv_and_lost_write_are_caught() {
        let mut h = good();
        h.watch[1].events[0].prev = None;
        assert!(check(&h).iter().any(|p| p.contains("not atomic or not the same history")));
        let mut h = good();
        h.ops.push(put_op(2, "b", "q", 3));
        let p = check(&h);
        assert!(
            p.iter().any(|p| p.contains("both") || p.contains("no watcher ever saw it") || p.contains("acknowledged at revision")),
            "{p:?}"
        );
    }

    #[test]
    fn invented_value_is_caught() {
        let mut h = good();
        h.ops.pop();
        assert!(check(&h).iter().any(|p| p.contains("which no client wrote")));
    }

    #[test]
    fn early_progress_notification_is_caught() {
        let mut h = good();
        h.watch.insert(1, WatchResponse { watcher: 0, member: 1, stream: 0, header_rev: 3, events: vec![], progress: true, at: 0 });
        let p = check(&h);
        assert!(p.iter().any(|p| p.contains("progress notification at revision 3 before events [3]")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("after a progress notification at 3")), "{p:?}");
    }
}

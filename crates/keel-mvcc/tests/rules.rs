//! The MVCC rules, checked on the store directly: revisions, versions, tombstones, history reads,
//! compaction, range options, restart. The same rules are checked against real etcd by
//! `crates/keel/tests/etcd_oracle.rs`.

use keel_mvcc::kv::{self, NoLeases};
use keel_mvcc::store::{CommitMode, Fetch};
use keel_mvcc::{IndexMode, KvError, Store};
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest};
use keel_proto::mvccpb::KeyValue;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn put(s: &mut Store, k: &str, v: &str) -> i64 {
    let mut w = s.write();
    kv::put(&mut w, &PutRequest { key: k.into(), value: v.into(), ..Default::default() }, &NoLeases).unwrap();
    w.end().0
}

fn del(s: &mut Store, k: &str, end: &str) -> (i64, i64) {
    let mut w = s.write();
    let r = kv::delete_range(&mut w, &DeleteRangeRequest { key: k.into(), range_end: end.into(), ..Default::default() }).unwrap();
    (w.end().0, r.deleted)
}

fn get_at(s: &Store, k: &str, rev: i64) -> Result<Option<KeyValue>, KvError> {
    kv::range(s, &RangeRequest { key: k.into(), revision: rev, ..Default::default() }).map(|r| r.kvs.into_iter().next())
}

/// Compacts at `rev`, every batch.
fn compact(s: &mut Store, rev: i64) {
    s.compact(rev).unwrap();
    while s.compacting() {
        s.compact_step();
    }
}

fn open() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(&d.path().join("db")).unwrap();
    (d, s)
}

#[test]
fn revisions_versions_and_tombstones() {
    let (_d, mut s) = open();
    assert_eq!(s.current_rev(), 1, "an empty store is at revision 1, as etcd");
    assert_eq!(put(&mut s, "a", "1"), 2);
    assert_eq!(put(&mut s, "a", "2"), 3);
    let kv = get_at(&s, "a", 0).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(del(&mut s, "a", ""), (4, 1));
    assert!(get_at(&s, "a", 0).unwrap().is_none());
    // Deleting nothing does not make a revision.
    assert_eq!(del(&mut s, "a", ""), (4, 0));
    assert_eq!(put(&mut s, "a", "3"), 5);
    let kv = get_at(&s, "a", 0).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1), "a new generation starts at version 1");
    // History.
    assert_eq!(get_at(&s, "a", 2).unwrap().unwrap().value, b"1");
    assert_eq!(get_at(&s, "a", 3).unwrap().unwrap().value, b"2");
    assert!(get_at(&s, "a", 4).unwrap().is_none());
    assert!(matches!(get_at(&s, "a", 6), Err(KvError::FutureRev)));
}

#[test]
fn compaction_rules() {
    let (_d, mut s) = open();
    for i in 0..5 {
        put(&mut s, "k", &i.to_string()); // revisions 2..=6
    }
    put(&mut s, "gone", "x"); // 7
    del(&mut s, "gone", ""); // 8
    compact(&mut s, 5);
    assert!(matches!(get_at(&s, "k", 4), Err(KvError::Compacted)));
    assert_eq!(get_at(&s, "k", 5).unwrap().unwrap().value, b"3", "the compaction revision itself stays readable");
    assert!(matches!(s.compact(5), Err(KvError::Compacted)));
    assert!(matches!(s.compact(4), Err(KvError::Compacted)));
    assert!(matches!(s.compact(100), Err(KvError::FutureRev)));
    compact(&mut s, 8);
    assert!(get_at(&s, "gone", 0).unwrap().is_none());
    assert_eq!(get_at(&s, "k", 0).unwrap().unwrap().version, 5);
}

#[test]
fn range_options() {
    let (_d, mut s) = open();
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("d", "0")] {
        put(&mut s, k, v);
    }
    put(&mut s, "b", "9"); // b: version 2, mod 6
    let all = |mut r: RangeRequest| {
        r.key = b"a".to_vec();
        r.range_end = b"z".to_vec();
        kv::range(&s, &r).unwrap()
    };
    let r = all(RangeRequest { limit: 2, ..Default::default() });
    assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 4));
    let r = all(RangeRequest { count_only: true, ..Default::default() });
    assert_eq!((r.kvs.len(), r.count), (0, 4));
    let r = all(RangeRequest { keys_only: true, ..Default::default() });
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    let r = all(RangeRequest { sort_target: SortTarget::Value as i32, sort_order: SortOrder::Descend as i32, ..Default::default() });
    let keys: Vec<_> = r.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b"b".to_vec(), b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
    let r = all(RangeRequest { min_mod_revision: 4, max_mod_revision: 5, ..Default::default() });
    let keys: Vec<_> = r.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b"c".to_vec(), b"d".to_vec()]);
    assert_eq!(r.count, 4, "count ignores filters, as etcd's");
    let r = all(RangeRequest { min_create_revision: 3, max_create_revision: 3, ..Default::default() });
    assert_eq!(r.kvs.len(), 1);
    // "\0" as range end: every key from `key`.
    let r = kv::range(&s, &RangeRequest { key: b"c".to_vec(), range_end: vec![0], ..Default::default() }).unwrap();
    assert_eq!(r.count, 2);
}

#[test]
fn restart_restores_everything_committed() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("db");
    {
        let mut s = Store::open(&path).unwrap();
        put(&mut s, "a", "1");
        put(&mut s, "a", "2");
        del(&mut s, "a", "");
        put(&mut s, "b", "1");
        compact(&mut s, 3);
        s.set_consistent_index(9, 2);
        s.commit().unwrap();
        put(&mut s, "uncommitted", "x");
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.current_rev(), 5);
    assert_eq!(s.compacted_rev(), 3);
    assert_eq!(s.consistent_index(), 9);
    assert!(get_at(&s, "a", 0).unwrap().is_none());
    assert_eq!(get_at(&s, "a", 3).unwrap().unwrap().value, b"2");
    assert!(get_at(&s, "uncommitted", 0).unwrap().is_none(), "what was never committed is replayed from the WAL instead");
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Del(u8, u8),
    Compact,
    /// Commit, close, and open again keeping the index as `MODES[n]` says.
    Commit(usize),
}

/// The ways a store keeps its index: all in memory; in the backend, merged at every batch
/// (budget 0) or every few (a small budget). A store reopened in another way reads the file the
/// first one wrote.
const MODES: [IndexMode; 3] = [IndexMode::Memory, IndexMode::Backend { budget: 0 }, IndexMode::Backend { budget: 600 }];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u8..6, 0u8..4).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..6, 0u8..7).prop_map(|(k, e)| Op::Del(k, e)),
        1 => Just(Op::Compact),
        1 => (0..MODES.len()).prop_map(Op::Commit),
    ]
}

/// The value of a put: one of four is longer than a page of the backend (stored in parts).
fn value_of(v: u8) -> String {
    if v == 3 {
        "3".repeat(9000)
    } else {
        v.to_string()
    }
}

/// A model: the full map of live keys after every revision.
type Model = BTreeMap<i64, BTreeMap<Vec<u8>, KeyValue>>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..60), mode in 0..MODES.len()) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let mut s = Store::open_with(&path, MODES[mode]).unwrap();
        let mut model: Model = BTreeMap::new();
        model.insert(1, BTreeMap::new());
        let mut compacted = 0i64;
        let mut ci = 0u64;
        for o in &ops {
            let cur = *model.keys().last().unwrap();
            let mut live = model[&cur].clone();
            match o {
                Op::Put(k, v) => {
                    let key = vec![b'a' + k];
                    let rev = put(&mut s, std::str::from_utf8(&key).unwrap(), &value_of(*v));
                    prop_assert_eq!(rev, cur + 1);
                    let prev = live.get(&key).cloned();
                    live.insert(key.clone(), KeyValue {
                        key, create_revision: prev.as_ref().map(|p| p.create_revision).unwrap_or(rev),
                        mod_revision: rev, version: prev.map(|p| p.version).unwrap_or(0) + 1,
                        value: value_of(*v).into_bytes(), lease: 0,
                    });
                    model.insert(rev, live);
                }
                Op::Del(k, e) => {
                    let key = vec![b'a' + k];
                    let end = if *e == 0 { vec![] } else { vec![b'a' + k + e] };
                    let victims: Vec<_> = live.keys().filter(|x| if end.is_empty() { **x == key } else { **x >= key && **x < end }).cloned().collect();
                    let (rev, n) = del(&mut s, std::str::from_utf8(&key).unwrap(), std::str::from_utf8(&end).unwrap());
                    prop_assert_eq!(n as usize, victims.len());
                    if !victims.is_empty() {
                        prop_assert_eq!(rev, cur + 1);
                        for v in victims { live.remove(&v); }
                        model.insert(rev, live);
                    } else {
                        prop_assert_eq!(rev, cur);
                    }
                }
                Op::Compact => {
                    let at = (compacted + cur) / 2 + 1;
                    if at > compacted && at <= cur {
                        compact(&mut s, at);
                        compacted = at;
                    }
                }
                Op::Commit(m) => {
                    ci += 1;
                    s.set_consistent_index(ci, 1);
                    s.commit().unwrap();
                    let counts = (s.live_key_count(), s.key_count(), s.data_size());
                    drop(s);
                    s = Store::open_with(&path, MODES[*m]).unwrap();
                    // Compacted-away keys a reopened store may count until its resumed compaction runs.
                    while s.compacting() {
                        s.compact_step();
                    }
                    prop_assert_eq!((s.live_key_count(), s.key_count(), s.data_size()), counts, "counts after reopening as {:?}", MODES[*m]);
                }
            }
        }
        // Every revision reads as the model says, or is compacted.
        let cur = *model.keys().last().unwrap();
        for rev in 1..=cur {
            let r = kv::range(&s, &RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() });
            if rev < compacted {
                prop_assert!(matches!(r, Err(KvError::Compacted)));
                continue;
            }
            let want: Vec<KeyValue> = model.range(..=rev).next_back().map(|(_, m)| m.values().cloned().collect()).unwrap_or_default();
            prop_assert_eq!(r.unwrap().kvs, want.clone(), "at revision {}", rev);
            // Keys only (from the index where it knows a key's generation): the same keys and
            // revisions, no values, no leases (etcd 3.7).
            let keys = kv::range(&s, &RangeRequest { key: vec![0], range_end: vec![0], revision: rev, keys_only: true, ..Default::default() }).unwrap();
            let no_values: Vec<KeyValue> = want.iter().cloned().map(|kv| KeyValue { value: Vec::new(), lease: 0, ..kv }).collect();
            prop_assert_eq!(keys.kvs, no_values.clone(), "keys only at revision {}", rev);
            // Pages of two, planned (as a stream plans them) then read: the same key-values.
            for fetch in [Fetch::Values, Fetch::Keys] {
                let mut from = vec![0u8];
                let mut paged = Vec::new();
                loop {
                    let (plan, more) = s.plan_page(&from, &[0], rev, 2, fetch).unwrap();
                    let page = plan.load().unwrap();
                    prop_assert!(page.len() <= 2);
                    prop_assert!(!more || page.len() == 2, "a page short of its limit is the last");
                    let Some(last) = page.last() else { break };
                    from = [last.key.as_slice(), &[0]].concat();
                    prop_assert_eq!(s.count_at(&from, &[0], rev).unwrap(), want.iter().filter(|kv| kv.key >= from).count() as i64);
                    paged.extend(page);
                    if !more {
                        break;
                    }
                }
                let expect = if fetch == Fetch::Values { &want } else { &no_values };
                prop_assert_eq!(&paged, expect, "pages at revision {}", rev);
            }
        }
    }
}

/// A read-only Txn served under `&Store` (the read lock) answers as the same Txn applied as a
/// write transaction does: branch taken, ranges, nested transactions, headers.
#[test]
fn read_only_txn_matches_the_write_path() {
    use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
    use keel_proto::etcdserverpb::{request_op, Compare, RequestOp, TxnRequest};
    let (_d, mut s) = open();
    put(&mut s, "a", "1");
    put(&mut s, "b", "2");
    let range =
        |k: &str| RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key: k.into(), ..Default::default() })) };
    let cmp = |v: i64| Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Version as i32,
        key: b"a".to_vec(),
        target_union: Some(TargetUnion::Version(v)),
        ..Default::default()
    };
    let nested = TxnRequest { compare: vec![cmp(9)], success: vec![range("a")], failure: vec![range("b")] };
    for t in [
        TxnRequest {
            compare: vec![cmp(1)],
            success: vec![range("a"), RequestOp { request: Some(request_op::Request::RequestTxn(nested.clone())) }],
            failure: vec![range("b")],
        },
        TxnRequest { compare: vec![cmp(2)], success: vec![range("a")], failure: vec![range("b")] },
    ] {
        assert!(kv::txn_is_read_only(&t));
        let read = kv::txn_read(&s, &t).unwrap();
        let mut w = s.write();
        let mut written = kv::txn(&mut w, &t, &NoLeases).unwrap();
        let (rev, events) = w.end();
        assert!(events.is_empty(), "a read-only transaction changes nothing");
        written.header = Some(keel_proto::etcdserverpb::ResponseHeader { revision: rev, ..Default::default() });
        assert_eq!(read, written);
    }
    let has_put = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest { key: b"x".to_vec(), ..Default::default() })),
        }],
        ..Default::default()
    };
    assert!(!kv::txn_is_read_only(&has_put) && kv::txn_has_put(&has_put));
}

/// Everything a reader can learn from the store: every revision's keys, the revision, the
/// counts and sizes.
fn observe(s: &Store) -> (i64, usize, usize, u64, Vec<Vec<KeyValue>>) {
    let cur = s.current_rev();
    let mut revs = Vec::new();
    for rev in s.compacted_rev().max(1)..=cur {
        let r = kv::range(s, &RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() });
        revs.push(r.map(|r| r.kvs).unwrap_or_default());
    }
    (cur, s.live_key_count(), s.key_count(), s.data_size(), revs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// A write transaction dropped half way (an error returned) or rolled back leaves the store
    /// exactly as it was, before and after a restart, and the next write takes the revision the
    /// rolled-back one would have had.
    #[test]
    fn rolled_back_transactions_leave_nothing(before in prop::collection::vec(op(), 0..30), txn in prop::collection::vec(op(), 1..8), explicit in any::<bool>(), mode in 0..MODES.len()) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let mut s = Store::open_with(&path, MODES[mode]).unwrap();
        for o in &before {
            match o {
                Op::Put(k, v) => { put(&mut s, &((b'a' + k) as char).to_string(), &v.to_string()); }
                Op::Del(k, e) => { del(&mut s, &((b'a' + k) as char).to_string(), &if *e == 0 { String::new() } else { ((b'a' + k + e) as char).to_string() }); }
                Op::Compact => { let at = s.current_rev() / 2; if at > s.compacted_rev() { compact(&mut s, at); } }
                Op::Commit(_) => { s.commit().unwrap(); }
            }
        }
        let seen = observe(&s);
        let mut w = s.write();
        for o in &txn {
            match o {
                Op::Put(k, v) => { kv::put(&mut w, &PutRequest { key: vec![b'a' + k], value: v.to_string().into_bytes(), prev_kv: true, ..Default::default() }, &NoLeases).unwrap(); }
                Op::Del(k, e) => {
                    let end = if *e == 0 { vec![] } else { vec![b'a' + k + e] };
                    kv::delete_range(&mut w, &DeleteRangeRequest { key: vec![b'a' + k], range_end: end, prev_kv: true }).unwrap();
                }
                _ => {}
            }
        }
        if explicit { w.rollback() } else { drop(w) }
        prop_assert_eq!(&observe(&s), &seen);
        let next = put(&mut s, "z", "after");
        prop_assert_eq!(next, seen.0 + 1);
        s.commit().unwrap();
        drop(s);
        let s = Store::open_with(&path, MODES[mode]).unwrap();
        prop_assert_eq!(s.current_rev(), seen.0 + 1);
        let r = kv::range(&s, &RangeRequest { key: vec![0], range_end: vec![0], revision: seen.0, ..Default::default() }).unwrap();
        prop_assert_eq!(&r.kvs, seen.4.last().unwrap());
    }
}

/// The quota's measure counts every auxiliary record (one per lease) once, through replaces,
/// deletes, commits and a restart: it is a running total now (the quota check used to sum
/// every record on every write).
#[test]
fn data_size_follows_auxiliary_records() {
    let (d, mut s) = open();
    let base = s.data_size();
    s.set_aux("lease/1", vec![0; 10]);
    s.set_aux("lease/2", vec![0; 20]);
    assert_eq!(s.data_size(), base + 7 + 10 + 7 + 20);
    s.set_aux("lease/1", vec![0; 4]);
    assert_eq!(s.data_size(), base + 7 + 4 + 7 + 20);
    s.delete_aux("lease/2");
    s.delete_aux("lease/3");
    assert_eq!(s.data_size(), base + 7 + 4);
    s.commit().unwrap();
    let size = s.data_size();
    drop(s);
    let s = Store::open(&d.path().join("db")).unwrap();
    assert_eq!(s.data_size(), size);
}

/// A read-only transaction is planned under the store's read lock and read after it: a write
/// can take the lock between the two (with the lock held while loading, it would wait, here
/// forever), and the answer is the store as planned, not as written since.
#[test]
fn a_planned_read_only_txn_holds_no_lock_and_answers_as_planned() {
    use keel_proto::etcdserverpb::{request_op, RequestOp, TxnRequest};
    let (_d, mut s) = open();
    put(&mut s, "a", "old");
    let shared = keel_mvcc::SharedStore::new(s);
    let t = TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest { key: b"a".to_vec(), ..Default::default() })),
        }],
        failure: vec![],
    };
    let plan = shared.plan_txn_read(&t).unwrap();
    assert_eq!(plan.len(), 1);
    // The write lock is free now.
    let mut store = shared.write();
    put(&mut store, "a", "new");
    drop(store);
    shared.commit().unwrap();
    let resp = plan.finish().unwrap();
    let got = match &resp.responses[0].response {
        Some(keel_proto::etcdserverpb::response_op::Response::ResponseRange(r)) => r.kvs[0].value.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(got, b"old");
    assert_eq!(resp.header.unwrap().revision, 2);
}

/// Compaction goes in batches of 1,000 keys: after `compact` no read sees the compacted history
/// (refused), each `compact_step` drops the superseded revisions of at most 1,000 keys, and the
/// store answers between batches as it does at the end; an unfinished compaction resumes after a
/// restart.
#[test]
fn compaction_runs_in_batches_and_resumes_after_a_restart() {
    let (d, mut s) = open();
    for i in 0..2500 {
        put(&mut s, &format!("k{i:05}"), "a");
        put(&mut s, &format!("k{i:05}"), "b");
    }
    let keys_before = s.key_count();
    let at = s.current_rev();
    s.compact(at).unwrap();
    assert!(matches!(get_at(&s, "k00000", 2), Err(KvError::Compacted)));
    assert_eq!(get_at(&s, "k02499", at).unwrap().unwrap().value, b"b");
    assert_eq!(s.compact_step(), 1000, "one batch: the older revision of 1,000 keys");
    assert!(s.compacting());
    assert_eq!(get_at(&s, "k00000", at).unwrap().unwrap().value, b"b");
    assert_eq!(get_at(&s, "k02499", at).unwrap().unwrap().value, b"b");
    s.commit().unwrap();
    drop(s);
    // Restarted with 1,500 keys' old revisions still in the backend: the compaction goes on.
    let mut s = Store::open(&d.path().join("db")).unwrap();
    assert!(s.compacting());
    let mut dropped = 0;
    while s.compacting() {
        dropped += s.compact_step();
    }
    assert_eq!(dropped, 1500);
    assert_eq!(s.key_count(), keys_before);
    let hash_now = s.hash_kv(0).unwrap();
    put(&mut s, "after", "x");
    assert_eq!(s.hash_kv(at).unwrap().0, hash_now.0, "HashKV at the compaction revision is unchanged");
}

/// A compaction's last deletions are due for a commit on their own (no write after them), and
/// the durable mark taken when it finished is reached only by a batch that holds them: before
/// it, on a failed commit, or with a batch already being written, it is not.
#[test]
fn a_compactions_deletions_are_durable_once_the_mark_taken_at_its_end_is_reached() {
    let (d, mut s) = open();
    for i in 0..300 {
        put(&mut s, &format!("k{i:03}"), "a");
        put(&mut s, &format!("k{i:03}"), "b");
    }
    s.commit().unwrap();
    assert_eq!(s.durable_mark(), s.committed_batches(), "nothing changed since the commit");
    let at = s.current_rev();
    compact(&mut s, at);
    s.commit().unwrap();
    // A second compaction's deletions alone (no revision, no index change after them).
    for i in 0..300 {
        put(&mut s, &format!("k{i:03}"), "c");
    }
    s.commit().unwrap();
    let at = s.current_rev();
    s.compact(at).unwrap();
    s.commit().unwrap();
    while s.compacting() {
        s.compact_step();
    }
    assert!(s.pending_changes() > 0);
    let mark = s.durable_mark();
    assert_eq!(mark, s.committed_batches() + 1);
    // Due a batch interval after the last commit, with no write since.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !s.commit_due() {
        assert!(std::time::Instant::now() < deadline, "a compaction's deletions alone never came due");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // A batch taken: the mark is reached when it is durable, not before; a failed one does not
    // count and gives its deletions back.
    let (batch, backend) = s.take_batch(CommitMode::Durable).unwrap();
    drop(backend);
    assert_eq!(s.durable_mark(), mark, "the batch in flight holds everything");
    s.abort_batch(batch);
    assert_eq!(s.committed_batches(), mark - 1);
    assert_eq!(s.durable_mark(), mark, "given back: the next batch holds them");
    s.commit().unwrap();
    assert_eq!(s.committed_batches(), mark);
    drop(s);
    // Reopened, the compaction goes over its keys again: nothing is left to drop.
    let mut s = Store::open(&d.path().join("db")).unwrap();
    let mut dropped = 0;
    while s.compacting() {
        dropped += s.compact_step();
    }
    assert_eq!(dropped, 0, "the compaction's deletions are all in the backend");
}

/// Takes and writes a batch as the committer does (durable only when one is owed); returns how.
fn write_batch(s: &mut Store) -> CommitMode {
    let (batch, backend) = s.take_batch(CommitMode::Visible).unwrap();
    batch.write_to(&backend).unwrap();
    s.finish_batch(&batch);
    batch.sync
}

/// At the default interval every batch taken on the batch interval's clock is durable (the
/// interval runs from a durable batch's take, not its end), and only one taken sooner, at the
/// batch limit, is just visible.
#[test]
fn batches_due_by_the_clock_are_durable_and_early_ones_only_visible() {
    let (_d, mut s) = open();
    put(&mut s, "a", "1");
    s.commit().unwrap();
    let mut last_durable = std::time::Instant::now();
    for round in 0..3 {
        put(&mut s, "a", &format!("{round}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !s.commit_due() {
            assert!(std::time::Instant::now() < deadline, "a batch never came due");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        last_durable = std::time::Instant::now();
        assert_eq!(write_batch(&mut s), CommitMode::Durable, "round {round}: due by the clock");
    }
    for i in 0..keel_mvcc::store::BATCH_LIMIT {
        put(&mut s, &format!("k{i:05}"), "v");
    }
    assert!(s.commit_due(), "the batch limit makes a batch due at once");
    let durable = s.committed_batches();
    // Taken within a batch interval of the last durable batch's take: only visible (unless
    // this machine took a whole batch interval to apply the changes above: then it was owed).
    let how = write_batch(&mut s);
    if last_durable.elapsed() < keel_mvcc::store::BATCH_INTERVAL {
        assert_eq!(how, CommitMode::Visible);
        assert_eq!(s.committed_batches(), durable);
    }
}

/// The committer's batches between two durable ones are only made visible: later reads find
/// their values in the backend, but neither the durable index (what a raft snapshot and the
/// WAL's release wait for) nor the durable mark moves until a durable batch, empty if nothing
/// else changed, covers them; one is owed at once when a waiter asks for it.
#[test]
fn visible_batches_count_as_durable_only_once_a_durable_batch_follows() {
    let (d, mut s) = open();
    // No durable batch comes due by the clock while the test runs, however slow the machine.
    s.set_sync_interval(std::time::Duration::from_secs(24 * 3600));
    put(&mut s, "a", "1");
    s.set_consistent_index(5, 1);
    s.commit().unwrap();
    assert_eq!(s.committed_index(), 5);
    let durable = s.committed_batches();
    put(&mut s, "b", "2");
    s.set_consistent_index(6, 1);
    let mark = s.durable_mark();
    assert_eq!(mark, durable + 1);
    assert_eq!(write_batch(&mut s), CommitMode::Visible, "no durable batch is owed yet");
    assert_eq!(s.committed_index(), 5, "a visible batch is not durable");
    assert_eq!(s.committed_batches(), durable);
    assert_eq!(s.durable_mark(), mark, "a durable batch is still owed");
    assert_eq!(s.pending_changes(), 0);
    assert_eq!(get_at(&s, "b", 0).unwrap().unwrap().value, b"2", "read back from the backend");
    assert!(s.take_batch(CommitMode::Visible).is_none(), "nothing new to make visible");
    s.commit().unwrap();
    assert_eq!(s.committed_index(), 6, "the empty durable batch covers the visible one");
    assert_eq!(s.committed_batches(), mark);
    assert!(s.take_batch(CommitMode::Durable).is_none(), "everything is durable");
    // A waiter's wish: due at once, and durable even when taken as visible.
    put(&mut s, "c", "3");
    s.set_consistent_index(7, 1);
    s.want_sync();
    assert!(s.commit_due());
    assert_eq!(write_batch(&mut s), CommitMode::Durable);
    assert_eq!(s.committed_index(), 7);
    // A visible batch then a clean close: redb makes it durable as it closes.
    put(&mut s, "d", "4");
    s.set_consistent_index(8, 1);
    assert_eq!(write_batch(&mut s), CommitMode::Visible);
    drop(s);
    let s = Store::open(&d.path().join("db")).unwrap();
    assert_eq!(s.consistent_index(), 8);
    assert_eq!(get_at(&s, "d", 0).unwrap().unwrap().value, b"4");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// A compaction's hash (planned as it begins, the revisions it keeps collected by its
    /// batches) is HashKV at its revision taken just before it, as etcd's compaction hash is:
    /// after earlier compactions, with writes and deletes between its batches (one key a
    /// batch), and a newer compaction started before it finished dropping its hash.
    #[test]
    fn a_compactions_hash_is_hashkv_at_its_revision(ops in prop::collection::vec((0u8..6, 0u8..10), 1..80)) {
        let (_d, mut s) = open();
        let mut expected: Option<(i64, u32)> = None;
        for (i, (key, what)) in ops.into_iter().enumerate() {
            let k = format!("k{key}");
            match what {
                0 | 1 => {
                    del(&mut s, &k, "");
                }
                2 => {
                    let at = s.current_rev();
                    if at > s.compacted_rev() {
                        expected = Some((at, s.hash_kv(at).unwrap().0));
                        s.compact(at).unwrap();
                    }
                }
                _ => {
                    put(&mut s, &k, &format!("v{i}"));
                }
            }
            s.compact_keys(1);
            if let Some(plan) = s.take_compaction_hash() {
                let (at, want) = expected.take().expect("a hash only for the compaction under way");
                prop_assert_eq!(plan.revision(), at);
                prop_assert_eq!(plan.run().unwrap().0, want, "compaction at {}", at);
            }
        }
    }
}

/// Applies `o` to `s`; a commit stays open (no restart).
fn run(s: &mut Store, o: &Op) {
    match o {
        Op::Put(k, v) => {
            put(s, &((b'a' + k) as char).to_string(), &v.to_string());
        }
        Op::Del(k, e) => {
            del(s, &((b'a' + k) as char).to_string(), &if *e == 0 { String::new() } else { ((b'a' + k + e) as char).to_string() });
        }
        Op::Compact => {
            let at = s.current_rev() / 2 + 1;
            if at > s.compacted_rev() && at <= s.current_rev() {
                compact(s, at);
            }
        }
        Op::Commit(_) => s.commit().unwrap(),
    }
}

/// Runs the compaction a reopened store resumes to its end (until then it may count keys that
/// compaction removed).
fn settle(s: &mut Store) {
    while s.compacting() {
        s.compact_step();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// A defragmentation copies what the index needs with the records: a store whose index is
    /// kept in the backend (merged at every batch, or every few) or whose file holds one reads
    /// the same after it, and after a restart in any mode, whatever was written, deleted,
    /// compacted and merged before the copy and while it ran (the copy's tail).
    #[test]
    fn a_defragmented_store_reads_as_before(
        before in prop::collection::vec(op(), 0..40),
        during in prop::collection::vec(op(), 0..20),
        mode in 0..MODES.len(),
        reopen in 0..MODES.len(),
    ) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("db");
        let mut s = Store::open_with(&path, MODES[mode]).unwrap();
        for o in &before {
            run(&mut s, o);
        }
        s.commit().unwrap();
        let backend = s.begin_defrag().unwrap();
        let (copy, _) = backend.copy_to(&keel_mvcc::store::defrag_path(&path), s.copies_index()).unwrap();
        for o in &during {
            run(&mut s, o);
        }
        s.commit().unwrap();
        let seen = observe(&s);
        let (_, old) = s.finish_defrag(copy, 0).unwrap();
        drop(old);
        prop_assert_eq!(&observe(&s), &seen, "after the swap");
        put(&mut s, "z", "after");
        s.commit().unwrap();
        let seen = observe(&s);
        drop(s);
        let mut s = Store::open_with(&path, MODES[reopen]).unwrap();
        settle(&mut s);
        prop_assert_eq!(&observe(&s), &seen, "after reopening as {:?}", MODES[reopen]);
    }
}

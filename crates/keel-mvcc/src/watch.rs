//! Watchers and how events reach them.
//!
//! A watcher is *synced* when it has seen every event up to the store's current revision: the
//! apply path hands each write's events (all of one revision, so one response: atomic) to
//! [`WatchHub::notify`], which sends them without touching the backend. A watcher that starts in
//! the past, or whose stream could not take an event (its bounded queue was full: a slow
//! client), is *unsynced*: a catch-up task reads its missing events from the store in batches of
//! whole revisions (one response per batch, as etcd's catch-up sends them), and moves it back to
//! the synced set under the store's read lock, so that no write can slip between the last event
//! read and the first event notified. Events therefore arrive in revision order, each once, with
//! no gap; a watcher whose next revision is older than the compaction revision is cancelled with
//! the compaction revision, as etcd does (the compaction revision itself can still be watched).
//!
//! Lock order: the store lock, then the hub's. Called by the apply path (notify, under the
//! store's write lock) and by the Watch service. Counts what it does in [`STATS`] (read by the
//! metrics at scrape time); calls nothing above the store.

use crate::SharedStore;
use keel_proto::etcdserverpb::{ResponseHeader, WatchResponse};
use keel_proto::mvccpb::{event::EventType, Event};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// The process's watch counters (etcd's `etcd_debugging_mvcc_watcher_total`,
/// `..._slow_watcher_total`, `..._events_total`).
pub struct WatchStats {
    watchers: AtomicI64,
    slow: AtomicI64,
    events: AtomicU64,
}

/// Every hub of this process counts here.
pub static STATS: WatchStats = WatchStats { watchers: AtomicI64::new(0), slow: AtomicI64::new(0), events: AtomicU64::new(0) };

impl WatchStats {
    /// Watchers that exist (synced or catching up).
    pub fn watchers(&self) -> i64 {
        self.watchers.load(Ordering::Relaxed)
    }
    /// Watchers catching up from the store (etcd's unsynced watchers).
    pub fn slow_watchers(&self) -> i64 {
        self.slow.load(Ordering::Relaxed)
    }
    /// Events sent to synced watchers since the process started.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// Revisions read per catch-up step.
const CATCHUP_REVS: i64 = 1000;

/// What a watcher watches.
#[derive(Clone, Debug)]
pub struct Spec {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Split responses larger than the request size limit into fragments.
    pub fragment: bool,
}

impl Spec {
    /// What a client's create request asks for.
    pub fn from_create(c: &keel_proto::etcdserverpb::WatchCreateRequest) -> Spec {
        use keel_proto::etcdserverpb::watch_create_request::FilterType;
        Spec {
            key: c.key.clone(),
            range_end: c.range_end.clone(),
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            fragment: c.fragment,
        }
    }

    fn matches(&self, ev: &Event) -> bool {
        let Some(kv) = &ev.kv else { return false };
        let k = kv.key.as_slice();
        let in_range = if self.range_end.is_empty() {
            k == self.key.as_slice()
        } else if self.range_end == [0u8] {
            k >= self.key.as_slice()
        } else {
            k >= self.key.as_slice() && k < self.range_end.as_slice()
        };
        if !in_range {
            return false;
        }
        let put = ev.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
    }

    fn shape(&self, ev: &Event) -> Event {
        let mut e = ev.clone();
        if !self.prev_kv {
            e.prev_kv = None;
        }
        e
    }
}

struct Watcher {
    spec: Spec,
    tx: mpsc::Sender<WatchResponse>,
    canceled: Arc<AtomicBool>,
    /// The next revision this watcher has not seen.
    next_rev: i64,
    /// Events before this revision are not for it (a watch that starts in the future).
    min_rev: i64,
}

/// A watcher's handle for its stream: cancel it with [`WatchHub::cancel`].
pub struct WatchHandle {
    canceled: Arc<AtomicBool>,
}

impl WatchHandle {
    /// True once the watcher is over: cancelled by its stream, or ended by the hub (compacted
    /// during catch-up), which has then sent the stream its cancel response.
    pub fn is_over(&self) -> bool {
        self.canceled.load(Ordering::Acquire)
    }
}

type WatchId = (u64, i64);

/// The synced watchers, indexed so that an event reaches only the watchers it concerns: watchers
/// of one key by that key, range watchers (few, usually) in a list scanned per event.
#[derive(Default)]
struct Synced {
    all: HashMap<WatchId, Watcher>,
    by_key: HashMap<Vec<u8>, Vec<WatchId>>,
    ranges: Vec<WatchId>,
    /// Every synced watcher has been handed the events of every revision up to this one.
    last_rev: i64,
    /// Watchers the hub ended itself (compacted during catch-up, history unreadable) and their
    /// stream has not removed yet: they no longer hold back the stream's progress answers.
    ended: std::collections::HashSet<WatchId>,
}

impl Synced {
    fn contains_key(&self, id: &WatchId) -> bool {
        self.all.contains_key(id)
    }

    fn insert(&mut self, id: WatchId, w: Watcher) {
        if w.spec.range_end.is_empty() {
            self.by_key.entry(w.spec.key.clone()).or_default().push(id);
        } else {
            self.ranges.push(id);
        }
        if let Some(old) = self.all.insert(id, w) {
            self.unindex(id, &old.spec);
        }
    }

    fn unindex(&mut self, id: WatchId, spec: &Spec) {
        if spec.range_end.is_empty() {
            if let Some(v) = self.by_key.get_mut(&spec.key) {
                if let Some(i) = v.iter().position(|x| *x == id) {
                    v.swap_remove(i);
                }
                if v.is_empty() {
                    self.by_key.remove(&spec.key);
                }
            }
        } else if let Some(i) = self.ranges.iter().position(|x| *x == id) {
            self.ranges.swap_remove(i);
        }
    }

    fn remove(&mut self, id: &WatchId) -> Option<Watcher> {
        let w = self.all.remove(id)?;
        self.unindex(*id, &w.spec);
        Some(w)
    }

    /// Every watcher, each with the next revision it has not seen.
    fn drain(&mut self) -> Vec<(WatchId, Watcher)> {
        let floor = self.last_rev + 1;
        self.by_key.clear();
        self.ranges.clear();
        self.all
            .drain()
            .map(|(id, mut w)| {
                w.next_rev = w.next_rev.max(floor);
                (id, w)
            })
            .collect()
    }

    /// The watchers `events` may concern.
    fn candidates(&self, events: &[Event]) -> Vec<WatchId> {
        let mut out: Vec<WatchId> = self.ranges.clone();
        for e in events {
            if let Some(ids) = e.kv.as_ref().and_then(|kv| self.by_key.get(&kv.key)) {
                out.extend_from_slice(ids);
            }
        }
        if events.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
        out
    }
}

pub struct WatchHub {
    synced: Mutex<Synced>,
    store: Arc<SharedStore>,
    /// The current raft term, for response headers.
    term: TermSource,
    cluster_id: u64,
    member_id: u64,
    prev_watchers: std::sync::atomic::AtomicUsize,
    /// Responses above this many bytes are fragmented for watchers that asked for it.
    max_bytes: usize,
    /// The runtime catch-up tasks run on: [`WatchHub::resync_all`] is called from the raft
    /// thread (a snapshot installed), which is not inside the runtime.
    rt: Option<tokio::runtime::Handle>,
}

/// Splits a response's events into responses of at most `max` bytes (each with at least one
/// event); all but the last carry `fragment`.
fn fragments(resp: WatchResponse, max: usize) -> Vec<WatchResponse> {
    use prost::Message;
    if resp.encoded_len() <= max || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut out = Vec::new();
    let mut cur = WatchResponse { events: Vec::new(), ..resp.clone() };
    let mut size = 0;
    for e in resp.events {
        let n = e.encoded_len() + 8;
        if !cur.events.is_empty() && size + n > max {
            let next = WatchResponse { events: Vec::new(), ..cur.clone() };
            cur.fragment = true;
            out.push(std::mem::replace(&mut cur, next));
            size = 0;
        }
        size += n;
        cur.events.push(e);
    }
    cur.fragment = false;
    out.push(cur);
    out
}

/// Where the hub reads the raft term its response headers carry.
pub type TermSource = Box<dyn Fn() -> u64 + Send + Sync>;

impl WatchHub {
    pub fn new(store: Arc<SharedStore>, term: TermSource, cluster_id: u64, member_id: u64, max_bytes: usize) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            synced: Mutex::new(Synced::default()),
            store,
            term,
            cluster_id,
            member_id,
            prev_watchers: 0.into(),
            max_bytes,
            rt: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// A progress notification for every watcher in `ids` of a stream, if all of them are synced
    /// or over (else none: progress must never run ahead of events still to be sent). Sent with
    /// the store's read lock held, so no event of a newer revision can be queued before it.
    pub fn progress(&self, stream: u64, ids: &[i64], watch_id: i64, tx: &mpsc::Sender<WatchResponse>) -> bool {
        let store = self.store.read();
        let synced = self.lock();
        if !ids.iter().all(|id| synced.contains_key(&(stream, *id)) || synced.ended.contains(&(stream, *id))) {
            return false;
        }
        let resp = WatchResponse { header: self.header(store.current_rev()), watch_id, ..Default::default() };
        tx.try_send(resp).is_ok()
    }

    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { cluster_id: self.cluster_id, member_id: self.member_id, revision, raft_term: (self.term)() })
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Synced> {
        self.synced.lock()
    }

    /// True when some watcher wants prev_kv (the apply path then fills it in on every event).
    pub fn wants_prev(&self) -> bool {
        self.prev_watchers.load(Ordering::Relaxed) > 0
    }

    /// Hands one revision's events to the synced watchers (apply path, store write lock held).
    pub fn notify(self: &Arc<Self>, rev: i64, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut w = self.lock();
        let mut fallen_behind = Vec::new();
        let mut gone = Vec::new();
        for id in w.candidates(events) {
            let Some(watcher) = w.all.get_mut(&id) else { continue };
            if rev < watcher.min_rev {
                continue;
            }
            watcher.next_rev = rev + 1;
            let evs: Vec<Event> = events.iter().filter(|e| watcher.spec.matches(e)).map(|e| watcher.spec.shape(e)).collect();
            if evs.is_empty() {
                continue;
            }
            let id = &id;
            let n = evs.len() as u64;
            let resp = WatchResponse { header: self.header(rev), watch_id: id.1, events: evs, ..Default::default() };
            let parts = if watcher.spec.fragment { fragments(resp, self.max_bytes) } else { vec![resp] };
            // All fragments of a revision go, or none (the watcher then catches up).
            let sent = if watcher.tx.capacity() < parts.len() {
                Err(mpsc::error::TrySendError::Full(()))
            } else {
                parts.into_iter().try_for_each(|p| {
                    watcher.tx.try_send(p).map_err(|e| match e {
                        mpsc::error::TrySendError::Full(_) => mpsc::error::TrySendError::Full(()),
                        mpsc::error::TrySendError::Closed(_) => mpsc::error::TrySendError::Closed(()),
                    })
                })
            };
            match sent {
                Ok(()) => drop(STATS.events.fetch_add(n, Ordering::Relaxed)),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // A slow client: catch it up later from the store, from this revision on.
                    fallen_behind.push((*id, watcher.spec.clone(), watcher.tx.clone(), watcher.canceled.clone()));
                    gone.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        for id in gone {
            w.remove(&id);
        }
        w.last_rev = w.last_rev.max(rev);
        drop(w);
        for (id, spec, tx, canceled) in fallen_behind {
            tracing::debug!(stream = id.0, watch_id = id.1, revision = rev, "watch: slow watcher moved to catch-up");
            self.spawn_catchup(id, spec, tx, canceled, rev);
        }
    }

    /// Registers a watcher that wants events from `start` (0: from the next revision). Returns
    /// the current revision (for the `created` response, which the caller has to send first: it
    /// is sent from here, before any event).
    pub fn watch(
        self: &Arc<Self>,
        id: (u64, i64),
        spec: Spec,
        start: i64,
        tx: mpsc::Sender<WatchResponse>,
    ) -> Result<WatchHandle, WatchResponse> {
        let canceled = Arc::new(AtomicBool::new(false));
        let store = self.store.read();
        let cur = store.current_rev();
        let created = WatchResponse { header: self.header(cur), watch_id: id.1, created: true, ..Default::default() };
        if tx.try_send(created).is_err() {
            return Err(WatchResponse {
                header: self.header(cur),
                watch_id: id.1,
                canceled: true,
                cancel_reason: "watch stream is full".into(),
                ..Default::default()
            });
        }
        // Counted once the watcher exists (a refused one is never cancelled, so never uncounted).
        if spec.prev_kv {
            self.prev_watchers.fetch_add(1, Ordering::Relaxed);
        }
        if start == 0 || start > cur {
            // Synced now; events start after `cur`, or at a future `start`.
            let min_rev = start.max(cur + 1);
            self.lock().insert(id, Watcher { spec, tx, canceled: canceled.clone(), next_rev: cur + 1, min_rev });
        } else {
            drop(store);
            self.spawn_catchup(id, spec, tx, canceled.clone(), start);
        }
        STATS.watchers.fetch_add(1, Ordering::Relaxed);
        Ok(WatchHandle { canceled })
    }

    /// A watcher for Keel's own use (elections, locks): events arrive on the returned channel
    /// until the returned handle is dropped.
    pub fn subscribe(self: &Arc<Self>, spec: Spec, start: i64) -> (mpsc::Receiver<WatchResponse>, Subscription) {
        static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        let id = (u64::MAX, NEXT.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel(64);
        let prev = spec.prev_kv;
        let handle = self.watch(id, spec, start, tx).ok();
        (rx, Subscription { hub: self.clone(), id, handle, prev })
    }

    /// Removes a watcher.
    pub fn cancel(&self, id: (u64, i64), handle: &WatchHandle, prev_kv: bool) {
        if !handle.canceled.swap(true, Ordering::AcqRel) {
            STATS.watchers.fetch_sub(1, Ordering::Relaxed);
        }
        let mut synced = self.lock();
        synced.remove(&id);
        synced.ended.remove(&id);
        drop(synced);
        if prev_kv {
            self.prev_watchers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// After the store was replaced (a snapshot from the leader), every synced watcher catches up
    /// from the new store.
    pub fn resync_all(self: &Arc<Self>) {
        let all: Vec<_> = self.lock().drain();
        for (id, w) in all {
            self.spawn_catchup(id, w.spec, w.tx, w.canceled, w.next_rev.max(w.min_rev));
        }
    }

    fn spawn_catchup(self: &Arc<Self>, id: (u64, i64), spec: Spec, tx: mpsc::Sender<WatchResponse>, canceled: Arc<AtomicBool>, from: i64) {
        let hub = self.clone();
        // Counted as etcd counts its unsynced watchers, for as long as the catch-up runs.
        let slow = &STATS.slow;
        slow.fetch_add(1, Ordering::Relaxed);
        let task = async move {
            hub.catch_up(id, spec, tx, canceled, from).await;
            slow.fetch_sub(1, Ordering::Relaxed);
        };
        match &self.rt {
            Some(rt) => drop(rt.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    async fn catch_up(
        self: Arc<Self>,
        id: (u64, i64),
        spec: Spec,
        tx: mpsc::Sender<WatchResponse>,
        canceled: Arc<AtomicBool>,
        mut next: i64,
    ) {
        loop {
            if canceled.load(Ordering::Acquire) || tx.is_closed() {
                return;
            }
            // Read a batch of history, or join the synced set if there is none left.
            enum Step {
                Compacted(i64, i64),
                Joined,
                Batch(Box<crate::store::EventsPlan>, i64),
                Fail,
            }
            let step = {
                let store = self.store.read();
                let cur = store.current_rev();
                // As etcd 3.6: history from the compaction revision itself is still there (a
                // tombstone at it is kept), only what is older is gone.
                if next < store.compacted_rev() {
                    Step::Compacted(cur, store.compacted_rev())
                } else if next > cur {
                    if !canceled.load(Ordering::Acquire) {
                        self.lock().insert(
                            id,
                            Watcher { spec: spec.clone(), tx: tx.clone(), canceled: canceled.clone(), next_rev: next, min_rev: next },
                        );
                    }
                    Step::Joined
                } else {
                    // Planned under the lock (an index walk), read after it.
                    let to = cur.min(next + CATCHUP_REVS - 1);
                    match store.plan_events(&spec.key, &spec.range_end, next, to, spec.prev_kv) {
                        Ok(plan) => Step::Batch(Box::new(plan), to),
                        Err(e) => {
                            tracing::error!(error = %e, "watch: cannot read history");
                            Step::Fail
                        }
                    }
                }
            };
            let batch = match step {
                Step::Compacted(cur, compacted) => {
                    let resp = WatchResponse {
                        header: self.header(cur),
                        watch_id: id.1,
                        canceled: true,
                        compact_revision: compacted,
                        ..Default::default()
                    };
                    self.end(id, &canceled, resp, &tx).await;
                    return;
                }
                Step::Joined => return,
                Step::Fail => {
                    self.end(id, &canceled, self.unreadable(id), &tx).await;
                    return;
                }
                Step::Batch(plan, to) => match plan.load() {
                    Ok(evs) => (evs, to),
                    Err(e) => {
                        tracing::error!(error = %e, "watch: cannot read history");
                        self.end(id, &canceled, self.unreadable(id), &tx).await;
                        return;
                    }
                },
            };
            let (events, to) = batch;
            // As etcd's catch-up: the batch's events in one response (every revision whole), with
            // the revision it was read up to in the header; split only for a fragmenting watcher.
            let group: Vec<Event> = events.iter().filter(|e| spec.matches(e)).map(|e| spec.shape(e)).collect();
            if !group.is_empty() {
                let resp = WatchResponse { header: self.header(to), watch_id: id.1, events: group, ..Default::default() };
                let parts = if spec.fragment { fragments(resp, self.max_bytes) } else { vec![resp] };
                for p in parts {
                    if tx.send(p).await.is_err() {
                        return;
                    }
                }
            }
            next = to + 1;
        }
    }

    /// The cancel response of a watcher whose history cannot be read.
    fn unreadable(&self, id: WatchId) -> WatchResponse {
        let cur = self.store.read().current_rev();
        WatchResponse {
            header: self.header(cur),
            watch_id: id.1,
            canceled: true,
            cancel_reason: "keel: cannot read the watched history".into(),
            ..Default::default()
        }
    }

    /// Ends a watcher from the hub's side: it is over (its stream drops it, its progress
    /// answers no longer wait for it) before its cancel response is queued, so a progress
    /// request that follows the cancel response is answered.
    async fn end(&self, id: WatchId, canceled: &AtomicBool, resp: WatchResponse, tx: &mpsc::Sender<WatchResponse>) {
        if !canceled.swap(true, Ordering::AcqRel) {
            STATS.watchers.fetch_sub(1, Ordering::Relaxed);
            self.lock().ended.insert(id);
        }
        let _ = tx.send(resp).await;
    }
}

/// An internal watcher; cancelled when dropped.
pub struct Subscription {
    hub: Arc<WatchHub>,
    id: (u64, i64),
    handle: Option<WatchHandle>,
    prev: bool,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.hub.cancel(self.id, &h, self.prev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::mvccpb::KeyValue;

    #[test]
    fn large_responses_are_fragmented_in_order() {
        let events: Vec<Event> = (0..10)
            .map(|i| Event {
                kv: Some(KeyValue { key: vec![i], value: vec![0; 100], mod_revision: 5, ..Default::default() }),
                ..Default::default()
            })
            .collect();
        let resp = WatchResponse { watch_id: 3, events: events.clone(), ..Default::default() };
        let parts = fragments(resp, 300);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        let joined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(joined, events);
    }
    /// A watcher that starts in the past and whose catch-up is overtaken by a compaction is
    /// cancelled with the compaction revision; the stream's progress requests are answered
    /// again afterwards (it no longer waits for that watcher to sync). Regression: it stayed
    /// counted, and kube-apiserver's consistent reads wait for progress answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watcher_compacted_during_catch_up_does_not_block_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SharedStore::new(crate::store::Store::open(&dir.path().join("db")).unwrap()));
        let put = |s: &mut crate::store::Store, n: usize| {
            for _ in 0..n {
                let mut t = s.write();
                t.put(b"a", Some(b"v"), None, false).unwrap();
                t.finish();
            }
        };
        put(&mut store.write(), 5);
        let hub = WatchHub::new(store.clone(), Box::new(|| 1), 1, 1, 1 << 20);
        let spec = Spec { key: b"a".to_vec(), range_end: vec![], prev_kv: false, no_put: false, no_delete: false, fragment: false };
        // Room for the created response only: whatever the catch-up reads first, it waits to
        // send it.
        let (tx, mut rx) = mpsc::channel(1);
        let _handle = hub.watch((7, 0), spec, 1, tx).map_err(|_| ()).unwrap();
        // History moves on and is compacted past where the catch-up is, in one step: the
        // catch-up read either revisions 1..=6 (and resumes at 7, now compacted) or nothing.
        {
            let mut s = store.write();
            put(&mut s, 5);
            s.compact(8).unwrap();
            while s.compacting() {
                s.compact_step();
            }
        }
        let mut compacted = None;
        while let Some(r) = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await.unwrap() {
            if r.canceled {
                compacted = Some(r.compact_revision);
                break;
            }
        }
        assert_eq!(compacted, Some(8), "the watcher is cancelled with the compaction revision");
        // The stream's only watcher ended: a progress request on the stream is answered.
        let (ptx, mut prx) = mpsc::channel(4);
        assert!(hub.progress(7, &[0], -1, &ptx), "progress refused after the watcher ended");
        assert_eq!(prx.recv().await.unwrap().header.unwrap().revision, store.read().current_rev());
    }
}

//! etcd's KV semantics on top of the store: Range, Put, DeleteRange, Txn and Compact.
//!
//! Requests arrive here already validated for shape (non-empty keys, txn size, duplicate keys);
//! what depends on the store's state (revisions, lease and key existence) is checked here, before
//! any change, so that a failing request changes nothing.

pub use crate::error::KvError;
use crate::store::{Fetch, Store, WriteTxn};
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::{
    compare, request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use keel_proto::mvccpb::{Event, KeyValue};

/// Limits checked on requests before they are proposed.
#[derive(Debug, Clone, Copy)]
pub struct TxnLimits {
    pub max_txn_ops: usize,
}

/// Answers whether a lease exists; the lessor lives outside this crate.
pub trait Leases {
    fn exists(&self, id: i64) -> bool;
}

/// No lease exists (a store without a lessor).
pub struct NoLeases;
impl Leases for NoLeases {
    fn exists(&self, _id: i64) -> bool {
        false
    }
}

/// What a read needs from either the committed store or a write transaction in progress.
trait View {
    fn store(&self) -> &Store;
    fn read_rev(&self) -> i64;
    fn range_kvs(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(Vec<KeyValue>, i64), KvError>;
}

impl View for Store {
    fn store(&self) -> &Store {
        self
    }
    fn read_rev(&self) -> i64 {
        self.current_rev()
    }
    fn range_kvs(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.range_at(key, end, at, limit, fetch)
    }
}

impl View for WriteTxn<'_> {
    fn store(&self) -> &Store {
        WriteTxn::store(self)
    }
    fn read_rev(&self) -> i64 {
        WriteTxn::read_rev(self)
    }
    fn range_kvs(&self, key: &[u8], end: &[u8], at: i64, limit: usize, fetch: Fetch) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.range_at(key, end, at, limit, fetch)
    }
}

fn header(rev: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision: rev, ..Default::default() })
}

/// Serves a Range on the store as it is (the whole read under `&Store`; a shared store plans
/// it instead: [`crate::shared::SharedStore::range`]).
pub fn range(store: &Store, req: &RangeRequest) -> Result<RangeResponse, KvError> {
    do_range(store, req)
}

fn filtered(req: &RangeRequest) -> bool {
    req.min_mod_revision != 0 || req.max_mod_revision != 0 || req.min_create_revision != 0 || req.max_create_revision != 0
}

/// How many key-values a Range must read (0: all of them): its limit plus one, to tell whether
/// there is more, unless sorting or filtering needs them all.
pub fn fetch_limit(req: &RangeRequest) -> usize {
    let sort_order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let limit = if sort_order != SortOrder::None || filtered(req) { 0 } else { req.limit.max(0) as usize };
    if limit > 0 {
        limit + 1
    } else {
        0
    }
}

fn do_range(view: &dyn View, req: &RangeRequest) -> Result<RangeResponse, KvError> {
    let cur = view.read_rev();
    let at = view.store().check_rev(req.revision, cur)?;
    let (kvs, count) = view.range_kvs(&req.key, &req.range_end, at, fetch_limit(req), Fetch::of(req))?;
    Ok(shape_range(req, kvs, count, cur))
}

/// A Range's answer from the key-values read (at most [`fetch_limit`] of them, in key order)
/// and the number of keys in the range: filters, sort order, limit and `more`, `keys_only`.
pub fn shape_range(req: &RangeRequest, mut kvs: Vec<KeyValue>, count: i64, cur: i64) -> RangeResponse {
    let sort_order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let sort_target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    if filtered(req) {
        kvs.retain(|kv| {
            !(req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision
                || req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision
                || req.max_create_revision != 0 && kv.create_revision > req.max_create_revision
                || req.min_create_revision != 0 && kv.create_revision < req.min_create_revision)
        });
    }
    let order = if sort_target != SortTarget::Key && sort_order == SortOrder::None { SortOrder::Ascend } else { sort_order };
    if order != SortOrder::None {
        // Stable either way: keys that tie on the target stay in key order (as etcd's small-slice
        // sort leaves them).
        let desc = order == SortOrder::Descend;
        let cmp = |a: &KeyValue, b: &KeyValue| -> std::cmp::Ordering {
            let o = match sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            };
            if desc {
                o.reverse()
            } else {
                o
            }
        };
        kvs.sort_by(cmp);
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        // Read with their values only to be sorted by them (else read as `Fetch::Keys`).
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse { header: header(cur), kvs, more, count }
}

fn check_put(view: &dyn View, req: &PutRequest, leases: &dyn Leases) -> Result<(), KvError> {
    if (req.ignore_value || req.ignore_lease) && view.store().live(&req.key)?.is_none() {
        return Err(KvError::KeyNotFound);
    }
    if !req.ignore_lease && req.lease != 0 && !leases.exists(req.lease) {
        return Err(KvError::LeaseNotFound);
    }
    Ok(())
}

/// A range inside a Txn, checked before anything is applied (etcd's `checkRequestRange`): unlike
/// a plain Range, a negative revision is not "now" but older than anything kept (compacted).
fn check_range(view: &dyn View, req: &RangeRequest) -> Result<(), KvError> {
    if req.revision == 0 {
        return Ok(());
    }
    if req.revision > view.read_rev() {
        return Err(KvError::FutureRev);
    }
    if req.revision < view.store().compacted_rev() {
        return Err(KvError::Compacted);
    }
    Ok(())
}

/// Applies a Put.
pub fn put(w: &mut WriteTxn, req: &PutRequest, leases: &dyn Leases) -> Result<PutResponse, KvError> {
    // A plain Put looks the lease up first; inside a Txn the missing key is reported first
    // (etcd's `applierV3backend.Put` and `checkRequestPut` differ in this order).
    if !req.ignore_lease && req.lease != 0 && !leases.exists(req.lease) {
        return Err(KvError::LeaseNotFound);
    }
    check_put(w, req, leases)?;
    let prev = do_put(w, req)?;
    Ok(PutResponse { header: None, prev_kv: prev })
}

fn do_put(w: &mut WriteTxn, req: &PutRequest) -> Result<Option<KeyValue>, KvError> {
    let value = if req.ignore_value { None } else { Some(req.value.as_slice()) };
    let lease = if req.ignore_lease { None } else { Some(req.lease) };
    let prev = w.put(&req.key, value, lease, req.prev_kv)?;
    Ok(if req.prev_kv { prev } else { None })
}

/// Applies a DeleteRange.
pub fn delete_range(w: &mut WriteTxn, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse, KvError> {
    let (deleted, prev_kvs) = w.delete_range(&req.key, &req.range_end, req.prev_kv)?;
    Ok(DeleteRangeResponse { header: None, deleted, prev_kvs })
}

/// Evaluates one comparison against the view.
fn compare_holds(view: &dyn View, c: &Compare) -> Result<bool, KvError> {
    let at = view.read_rev();
    let (kvs, _) = view.range_kvs(&c.key, &c.range_end, at, 0, Fetch::Values)?;
    let target = compare::CompareTarget::try_from(c.target).unwrap_or(compare::CompareTarget::Version);
    if kvs.is_empty() {
        if target == compare::CompareTarget::Value {
            // A missing key has no value to compare; etcd fails the comparison.
            return Ok(false);
        }
        return Ok(compare_kv(c, target, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
}

fn compare_kv(c: &Compare, target: compare::CompareTarget, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let ord = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        _ => {
            let (have, want) = match target {
                CompareTarget::Version => {
                    (kv.version, matches_i64(&c.target_union, |t| if let TargetUnion::Version(v) = t { Some(*v) } else { None }))
                }
                CompareTarget::Create => (
                    kv.create_revision,
                    matches_i64(&c.target_union, |t| if let TargetUnion::CreateRevision(v) = t { Some(*v) } else { None }),
                ),
                CompareTarget::Mod => {
                    (kv.mod_revision, matches_i64(&c.target_union, |t| if let TargetUnion::ModRevision(v) = t { Some(*v) } else { None }))
                }
                _ => (kv.lease, matches_i64(&c.target_union, |t| if let TargetUnion::Lease(v) = t { Some(*v) } else { None })),
            };
            have.cmp(&want)
        }
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord.is_eq(),
        CompareResult::NotEqual => ord.is_ne(),
        CompareResult::Greater => ord.is_gt(),
        CompareResult::Less => ord.is_lt(),
    }
}

fn matches_i64(t: &Option<compare::TargetUnion>, f: impl Fn(&compare::TargetUnion) -> Option<i64>) -> i64 {
    t.as_ref().and_then(f).unwrap_or(0)
}

/// Which branch each (nested) transaction takes, in depth-first order, decided before any change.
fn txn_path(view: &dyn View, req: &TxnRequest, path: &mut Vec<bool>) -> Result<(), KvError> {
    let mut ok = true;
    for c in &req.compare {
        if !compare_holds(view, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    let ops = if ok { &req.success } else { &req.failure };
    for op in ops {
        if let Some(request_op::Request::RequestTxn(t)) = &op.request {
            txn_path(view, t, path)?;
        }
    }
    Ok(())
}

fn check_ops(view: &dyn View, req: &TxnRequest, path: &[bool], pos: &mut usize, leases: &dyn Leases) -> Result<(), KvError> {
    let ok = path.get(*pos).copied().unwrap_or(false);
    *pos += 1;
    for op in if ok { &req.success } else { &req.failure } {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => check_range(view, r)?,
            Some(request_op::Request::RequestPut(p)) => check_put(view, p, leases)?,
            Some(request_op::Request::RequestTxn(t)) => check_ops(view, t, path, pos, leases)?,
            _ => {}
        }
    }
    Ok(())
}

/// Applies a Txn: compares, then every op of the chosen branch, all at one revision.
pub fn txn(w: &mut WriteTxn, req: &TxnRequest, leases: &dyn Leases) -> Result<TxnResponse, KvError> {
    let mut path = Vec::new();
    txn_path(w, req, &mut path)?;
    let mut pos = 0;
    check_ops(w, req, &path, &mut pos, leases)?;
    let mut pos = 0;
    exec_txn(w, req, &path, &mut pos)
}

/// Serves a read-only Txn (see [`txn_is_read_only`]) on the store as it is, under `&Store`.
pub fn txn_read(store: &Store, req: &TxnRequest) -> Result<TxnResponse, KvError> {
    plan_txn_read(store, req)?.finish()
}

/// Plans a read-only transaction (the caller checked [`txn_is_read_only`]) on the store as it
/// is: compares evaluated, every Range of the branches taken planned (an index walk). The
/// values are read by [`TxnReadPlan::finish`], which needs no lock: plan under the store's read
/// lock, finish after it, as a Range.
pub fn plan_txn_read(store: &Store, req: &TxnRequest) -> Result<TxnReadPlan, KvError> {
    let mut path = Vec::new();
    txn_path(store, req, &mut path)?;
    let mut pos = 0;
    check_ops(store, req, &path, &mut pos, &NoLeases)?;
    let mut pos = 0;
    let cur = store.current_rev();
    let branch = plan_branch(store, req, &path, &mut pos, cur)?;
    Ok(TxnReadPlan { branch, cur })
}

/// A read-only transaction with its reads planned ([`plan_txn_read`]).
pub struct TxnReadPlan {
    branch: PlannedBranch,
    cur: i64,
}

struct PlannedBranch {
    succeeded: bool,
    ops: Vec<PlannedOp>,
}

enum PlannedOp {
    Range { req: Box<RangeRequest>, plan: Box<crate::store::ReadPlan>, count: i64 },
    Txn(PlannedBranch),
    None,
}

fn plan_branch(store: &Store, req: &TxnRequest, path: &[bool], pos: &mut usize, cur: i64) -> Result<PlannedBranch, KvError> {
    let ok = path.get(*pos).copied().unwrap_or(false);
    *pos += 1;
    let ops: &[RequestOp] = if ok { &req.success } else { &req.failure };
    let mut planned = Vec::with_capacity(ops.len());
    for op in ops {
        planned.push(match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                let at = store.check_rev(r.revision, cur)?;
                let (plan, count) = store.plan_range(&r.key, &r.range_end, at, fetch_limit(r), Fetch::of(r))?;
                let shape = RangeRequest { key: Vec::new(), range_end: Vec::new(), ..r.clone() };
                PlannedOp::Range { req: Box::new(shape), plan: Box::new(plan), count }
            }
            Some(request_op::Request::RequestTxn(t)) => PlannedOp::Txn(plan_branch(store, t, path, pos, cur)?),
            Some(request_op::Request::RequestPut(_)) | Some(request_op::Request::RequestDeleteRange(_)) => {
                return Err(KvError::Corrupt("a write in a read-only transaction".into()))
            }
            None => PlannedOp::None,
        });
    }
    Ok(PlannedBranch { succeeded: ok, ops: planned })
}

impl TxnReadPlan {
    /// Key-values it will read.
    pub fn len(&self) -> usize {
        fn of(b: &PlannedBranch) -> usize {
            b.ops
                .iter()
                .map(|op| match op {
                    PlannedOp::Range { plan, .. } => plan.len(),
                    PlannedOp::Txn(t) => of(t),
                    PlannedOp::None => 0,
                })
                .sum()
        }
        of(&self.branch)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the values and shapes etcd's answer (as [`txn`] answers the same operations).
    pub fn finish(self) -> Result<TxnResponse, KvError> {
        let mut resp = finish_branch(self.branch, self.cur)?;
        resp.header = header(self.cur);
        Ok(resp)
    }
}

fn finish_branch(b: PlannedBranch, cur: i64) -> Result<TxnResponse, KvError> {
    let mut responses = Vec::with_capacity(b.ops.len());
    for op in b.ops {
        let resp = match op {
            PlannedOp::Range { req, plan, count } => {
                let mut rr = shape_range(&req, plan.load()?, count, cur);
                rr.header = header(cur);
                Some(response_op::Response::ResponseRange(rr))
            }
            PlannedOp::Txn(t) => {
                let mut tr = finish_branch(t, cur)?;
                // etcd gives a nested transaction an empty header.
                tr.header = Some(ResponseHeader::default());
                Some(response_op::Response::ResponseTxn(tr))
            }
            PlannedOp::None => None,
        };
        responses.push(ResponseOp { response: resp });
    }
    Ok(TxnResponse { header: None, succeeded: b.succeeded, responses })
}

/// What executing a transaction's operations needs besides reads: its writes.
trait Exec: View {
    fn exec_put(&mut self, p: &PutRequest) -> Result<Option<KeyValue>, KvError>;
    fn exec_delete(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse, KvError>;
}

impl Exec for WriteTxn<'_> {
    fn exec_put(&mut self, p: &PutRequest) -> Result<Option<KeyValue>, KvError> {
        do_put(self, p)
    }
    fn exec_delete(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse, KvError> {
        delete_range(self, d)
    }
}

fn exec_txn<E: Exec>(w: &mut E, req: &TxnRequest, path: &[bool], pos: &mut usize) -> Result<TxnResponse, KvError> {
    let ok = path.get(*pos).copied().unwrap_or(false);
    *pos += 1;
    let ops: &[RequestOp] = if ok { &req.success } else { &req.failure };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let resp = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                let mut rr = do_range(w, r)?;
                rr.header = header(w.read_rev());
                Some(response_op::Response::ResponseRange(rr))
            }
            Some(request_op::Request::RequestPut(p)) => {
                let prev = w.exec_put(p)?;
                Some(response_op::Response::ResponsePut(PutResponse { header: header(w.read_rev()), prev_kv: prev }))
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                let mut dr = w.exec_delete(d)?;
                dr.header = header(w.read_rev());
                Some(response_op::Response::ResponseDeleteRange(dr))
            }
            Some(request_op::Request::RequestTxn(t)) => {
                let mut tr = exec_txn(w, t, path, pos)?;
                // etcd gives a nested transaction an empty header.
                tr.header = Some(ResponseHeader::default());
                Some(response_op::Response::ResponseTxn(tr))
            }
            None => None,
        };
        responses.push(ResponseOp { response: resp });
    }
    Ok(TxnResponse { header: None, succeeded: ok, responses })
}

/// One part of a transaction met by [`walk_txn`].
#[derive(Debug, Clone, Copy)]
pub enum TxnPart<'a> {
    Compare(&'a Compare),
    Range(&'a RangeRequest),
    Put(&'a PutRequest),
    DeleteRange(&'a DeleteRangeRequest),
}

/// Visits every compare and operation of a transaction and of the transactions nested in it,
/// both branches, depth first, until `f` returns false; returns false if it did. The one walker
/// of nested transactions: permission checks, read-only and serializable tests, alarms.
pub fn walk_txn<'a>(t: &'a TxnRequest, f: &mut dyn FnMut(TxnPart<'a>) -> bool) -> bool {
    for c in &t.compare {
        if !f(TxnPart::Compare(c)) {
            return false;
        }
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        let go_on = match &op.request {
            Some(request_op::Request::RequestRange(r)) => f(TxnPart::Range(r)),
            Some(request_op::Request::RequestPut(p)) => f(TxnPart::Put(p)),
            Some(request_op::Request::RequestDeleteRange(d)) => f(TxnPart::DeleteRange(d)),
            Some(request_op::Request::RequestTxn(n)) => walk_txn(n, f),
            None => true,
        };
        if !go_on {
            return false;
        }
    }
    true
}

/// True when the transaction (and every nested one) only reads.
pub fn txn_is_read_only(req: &TxnRequest) -> bool {
    walk_txn(req, &mut |p| matches!(p, TxnPart::Compare(_) | TxnPart::Range(_)))
}

/// True when a transaction (or a nested one) may put a key.
pub fn txn_has_put(req: &TxnRequest) -> bool {
    !walk_txn(req, &mut |p| !matches!(p, TxnPart::Put(_)))
}

/// True when every range in the transaction (and nested ones) is serializable.
pub fn txn_serializable(req: &TxnRequest) -> bool {
    walk_txn(req, &mut |p| match p {
        TxnPart::Range(r) => r.serializable,
        _ => true,
    })
}

/// Events produced by a write, for watchers.
pub type Events = Vec<Event>;

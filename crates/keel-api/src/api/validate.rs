//! Request shape checks, before anything is proposed (etcd's `v3rpc/key.go`).

use crate::errors;
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::{request_op::Request, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest};
use std::collections::HashSet;
use tonic::Status;

pub fn range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(errors::invalid_sort_option());
    }
    Ok(())
}

pub fn put(r: &PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(errors::value_provided());
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(errors::lease_provided());
    }
    Ok(())
}

pub fn delete_range(r: &DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(errors::empty_key());
    }
    Ok(())
}

pub fn txn(r: &TxnRequest, max_ops: usize) -> Result<(), Status> {
    txn_shape(r, max_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn txn_shape(r: &TxnRequest, max_ops: usize) -> Result<(), Status> {
    if r.compare.len() > max_ops || r.success.len() > max_ops || r.failure.len() > max_ops {
        return Err(errors::too_many_ops());
    }
    for c in &r.compare {
        if c.key.is_empty() {
            return Err(errors::empty_key());
        }
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(Request::RequestRange(x)) => range(x)?,
            Some(Request::RequestPut(x)) => put(x)?,
            Some(Request::RequestDeleteRange(x)) => delete_range(x)?,
            Some(Request::RequestTxn(t)) => txn_shape(t, max_ops)?,
            // As etcd: an operation with no request in it is refused.
            None => return Err(errors::kv(keel_mvcc::KvError::KeyNotFound)),
        }
    }
    Ok(())
}

/// A deleted key interval: `[start, end)`, `end` None for a single key. Like etcd, the check
/// compares `end` literally: a `"\0"` end (all keys from `start`) yields an empty interval here,
/// so etcd accepts such a delete together with puts after `start`, and so does Keel.
#[derive(Clone)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn contains(&self, k: &[u8]) -> bool {
        match &self.end {
            None => self.start == k,
            Some(e) => k >= self.start.as_slice() && k < e.as_slice(),
        }
    }
}

fn hits(dels: &[Interval], k: &[u8]) -> bool {
    dels.iter().any(|d| d.contains(k))
}

/// etcd's duplicate-key rule: within one branch (and its nested transactions), no key may be put
/// twice or both put and deleted. The two branches of a nested transaction may overlap.
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Interval>), Status> {
    let mut dels: Vec<Interval> = Vec::new();
    for op in reqs {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            let end = if d.range_end.is_empty() { None } else { Some(d.range_end.clone()) };
            dels.push(Interval { start: d.key.clone(), end });
        }
    }
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        if let Some(Request::RequestTxn(t)) = &op.request {
            let (puts_then, dels_then) = check_intervals(&t.success)?;
            let (puts_else, dels_else) = check_intervals(&t.failure)?;
            for k in &puts_then {
                if puts.contains(k) || hits(&dels, k) {
                    return Err(errors::duplicate_key());
                }
                puts.insert(k.clone());
            }
            for k in &puts_else {
                if (puts.contains(k) && !puts_then.contains(k)) || hits(&dels, k) {
                    return Err(errors::duplicate_key());
                }
                puts.insert(k.clone());
            }
            dels.extend(dels_then);
            dels.extend(dels_else);
        }
    }
    for op in reqs {
        if let Some(Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || hits(&dels, &p.key) {
                return Err(errors::duplicate_key());
            }
            puts.insert(p.key.clone());
        }
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_op(k: &str) -> RequestOp {
        RequestOp { request: Some(Request::RequestPut(PutRequest { key: k.into(), ..Default::default() })) }
    }
    fn del_op(k: &str, e: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest { key: k.into(), range_end: e.into(), ..Default::default() })),
        }
    }

    #[test]
    fn duplicate_puts_and_overlapping_deletes() {
        let t = TxnRequest { success: vec![put_op("a"), put_op("a")], ..Default::default() };
        assert!(txn(&t, 128).is_err());
        let t = TxnRequest { success: vec![put_op("b"), del_op("a", "c")], ..Default::default() };
        assert!(txn(&t, 128).is_err());
        let t = TxnRequest { success: vec![put_op("c"), del_op("a", "c")], ..Default::default() };
        assert!(txn(&t, 128).is_ok());
        // Success and failure may touch the same key.
        let t = TxnRequest { success: vec![put_op("a")], failure: vec![put_op("a")], ..Default::default() };
        assert!(txn(&t, 128).is_ok());
        // A nested transaction's branches may overlap each other but not the parent.
        let nested = TxnRequest { success: vec![put_op("x")], failure: vec![put_op("x")], ..Default::default() };
        let t = TxnRequest { success: vec![RequestOp { request: Some(Request::RequestTxn(nested.clone())) }], ..Default::default() };
        assert!(txn(&t, 128).is_ok());
        let t = TxnRequest { success: vec![RequestOp { request: Some(Request::RequestTxn(nested)) }, put_op("x")], ..Default::default() };
        assert!(txn(&t, 128).is_err());
    }

    #[test]
    fn too_many_ops() {
        let t = TxnRequest { success: (0..3).map(|i| put_op(&format!("k{i}"))).collect(), ..Default::default() };
        assert!(txn(&t, 2).is_err());
        assert!(txn(&t, 3).is_ok());
    }

    #[test]
    fn an_operation_without_a_request_is_refused_as_etcd_does() {
        for t in [
            TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() },
            TxnRequest { failure: vec![put_op("a"), RequestOp { request: None }], ..Default::default() },
        ] {
            let e = txn(&t, 128).expect_err("an empty operation");
            assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "etcdserver: key not found"));
        }
    }
}

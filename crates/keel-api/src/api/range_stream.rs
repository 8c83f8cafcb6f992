//! etcd 3.7's `KV.RangeStream`: a range answered in chunks whose merge is the unary Range's
//! answer, read page by page at one pinned revision, so a stream holds at most a chunk or two in
//! memory however large the range is.
//!
//! The chunks follow etcd 3.7.3's rules: every chunk carries a disjoint slice of the key-values
//! in key order; the last one alone carries the header (the store's revision when the stream
//! began), `more` and `count` (keys sent plus those left out by the limit). Pages start at 10
//! key-values and double (or halve) while a chunk's size stays under half (or over twice) the
//! request size limit. A compaction past the pinned revision ends the stream with etcd's
//! "required revision has been compacted", as etcd's next chunk would.
//!
//! Calls the server core (pages planned under the store's read lock, read without it).

use crate::errors;
use keel_mvcc::store::Fetch;
use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::{RangeRequest, RangeResponse, RangeStreamResponse};
use keel_server::server::Server;
use prost::Message;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// Key-values of a stream's first page (etcd's `initialStreamChunkLimit`).
const FIRST_PAGE: i64 = 10;

/// Pages read with more key-values than this are read off the runtime's workers.
const BLOCKING_PAGE: usize = 256;

/// What etcd 3.7 refuses of a RangeStream besides a Range's own checks: any order but the
/// index's, and revision filters.
pub fn check(r: &RangeRequest) -> Result<(), Status> {
    super::validate::range(r)?;
    let order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    if !(order == SortOrder::None || (target == SortTarget::Key && order == SortOrder::Ascend)) {
        return Err(Status::new(Code::Unimplemented, "RangeStream does not support custom sort orders"));
    }
    if r.min_mod_revision != 0 || r.max_mod_revision != 0 || r.min_create_revision != 0 || r.max_create_revision != 0 {
        return Err(Status::new(Code::Unimplemented, "RangeStream does not support revision filters"));
    }
    Ok(())
}

/// The next page's limit after a chunk of `size` bytes read with `limit` (etcd's
/// `adjustChunkLimit`): doubled under half the target, halved over twice it, at least 1.
fn next_limit(limit: i64, size: usize, target: usize) -> i64 {
    let l = if size < target / 2 {
        limit.saturating_mul(2)
    } else if size > target.saturating_mul(2) {
        limit / 2
    } else {
        limit
    };
    l.max(1)
}

/// Sends the chunks of `r` (checked, permitted, its linearizable barrier passed) to `tx`; ends at
/// the last chunk, an error, or when the client goes away.
pub async fn run(server: Arc<Server>, r: RangeRequest, tx: mpsc::Sender<Result<RangeStreamResponse, Status>>) {
    if let Err(e) = stream(&server, r, &tx).await {
        let _ = tx.send(Err(e)).await;
    }
}

fn chunk(resp: RangeResponse) -> RangeStreamResponse {
    RangeStreamResponse { range_response: Some(resp) }
}

async fn stream(server: &Server, r: RangeRequest, tx: &mpsc::Sender<Result<RangeStreamResponse, Status>>) -> Result<(), Status> {
    let m = &keel_metrics::METRICS;
    let fetch = Fetch::of(&r);
    if fetch == Fetch::Count {
        // One chunk: the count, from the index.
        let page = server.plan_range(&r).map_err(errors::kv)?;
        let resp = page.finish().map_err(errors::kv)?;
        m.ranges.inc();
        let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        let _ = tx.send(Ok(chunk(RangeResponse { header: server.header(rev), count: resp.count, ..Default::default() }))).await;
        return Ok(());
    }
    // Each page is shaped as a Range of its own would be (a sort target with no order sorts the
    // page, as etcd's per-chunk Range does); limits are the stream's.
    let shape = RangeRequest { key: Vec::new(), range_end: Vec::new(), limit: 0, ..r.clone() };
    let total = if r.limit > 0 { r.limit } else { i64::MAX };
    let target = server.cfg().max_request_bytes as usize;
    let mut key = r.key.clone();
    let mut rev = r.revision;
    let mut limit = FIRST_PAGE.min(total);
    let mut sent = 0i64;
    let mut header_rev = 0i64;
    loop {
        let page = server.plan_range_page(&key, &r.range_end, rev, limit as usize, fetch).map_err(errors::kv)?;
        m.ranges.inc();
        if header_rev == 0 {
            // The stream's revision: the store's when it began; every page reads at it.
            header_rev = page.current();
            rev = page.at();
        }
        let more = page.more();
        let kvs = super::kv::read_planned_over(page.len(), BLOCKING_PAGE, move || page.finish()).await?;
        let mut out = keel_mvcc::kv::shape_range(&shape, kvs, 0, header_rev);
        out.header = None;
        out.count = 0;
        sent += out.kvs.len() as i64;
        let next = out.kvs.last().filter(|_| more).map(|kv| [kv.key.as_slice(), &[0]].concat());
        // The chunk's size as etcd measures its page (its header and count add a few bytes).
        let size = out.encoded_len();
        let done = next.is_none() || sent >= total;
        if done {
            out.header = server.header(header_rev);
            out.more = more;
            out.count = sent;
            if let Some(next) = &next {
                out.count += server.count_range_at(next, &r.range_end, rev).map_err(errors::kv)?;
            }
        }
        if tx.send(Ok(chunk(out))).await.is_err() {
            return Ok(());
        }
        match next {
            Some(n) if !done => {
                key = n;
                limit = next_limit(limit, size, target).min(total - sent);
            }
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_limits_follow_chunk_sizes_as_etcds() {
        let target = 1_572_864;
        assert_eq!(next_limit(10, 100, target), 20, "small chunks double");
        assert_eq!(next_limit(10, target, target), 10, "near the target stays");
        assert_eq!(next_limit(10, 2 * target + 1, target), 5, "big chunks halve");
        assert_eq!(next_limit(1, 10 * target, target), 1, "never below one");
        assert_eq!(next_limit(i64::MAX, 0, target), i64::MAX, "no overflow");
    }

    #[test]
    fn only_the_index_order_and_no_filters_are_streamed() {
        let ok = RangeRequest { key: b"a".to_vec(), ..Default::default() };
        assert!(check(&ok).is_ok());
        let asc = RangeRequest { sort_order: SortOrder::Ascend as i32, ..ok.clone() };
        assert!(check(&asc).is_ok());
        let by_version = RangeRequest { sort_target: SortTarget::Version as i32, ..ok.clone() };
        assert!(check(&by_version).is_ok(), "a target without an order is the default ordering to etcd");
        let desc = RangeRequest { sort_order: SortOrder::Descend as i32, ..ok.clone() };
        let e = check(&desc).unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Unimplemented, "RangeStream does not support custom sort orders"));
        let filtered = RangeRequest { min_mod_revision: 2, ..ok.clone() };
        let e = check(&filtered).unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Unimplemented, "RangeStream does not support revision filters"));
        let empty = RangeRequest::default();
        assert_eq!(check(&empty).unwrap_err().message(), "etcdserver: key is not provided");
    }
}

//! etcdserverpb.KV: Range, RangeStream (its chunks: `super::range_stream`), Put, DeleteRange, Txn,
//! Compact.

use super::validate;
use crate::errors;
use keel_mvcc::kv as mvcc_kv;
use keel_proto::etcdserverpb::kv_server::Kv;
use keel_proto::etcdserverpb::{
    request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
use keel_proto::keelpb::internal_raft_request::Request;
use keel_server::apply::Applied;
use keel_server::server::Server;
use std::sync::Arc;
use tonic::{Request as GrpcRequest, Response, Status};

type RangeStreamStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RangeStreamResponse, Status>> + Send>>;

pub struct KvService {
    pub server: Arc<Server>,
}

/// etcd's estimate of the bytes a put adds (key, value and per-key metadata).
fn cost_put(p: &PutRequest) -> u64 {
    (256 + p.key.len() + p.value.len()) as u64
}

/// The larger of the two branches' put costs (nested transactions included).
fn cost_txn(t: &TxnRequest) -> u64 {
    let branch = |ops: &[keel_proto::etcdserverpb::RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestPut(p)) => cost_put(p),
                Some(request_op::Request::RequestTxn(n)) => cost_txn(n),
                _ => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// Ranges reading more key-values than this are read off the runtime's workers.
const BIG_RANGE: usize = 1000;

fn unexpected() -> Status {
    Status::internal("etcdserver: unexpected apply result")
}

impl KvService {
    /// A transaction that writes nothing: no proposal; a linearizable barrier unless every read
    /// is serializable.
    async fn read_only_txn(&self, r: &TxnRequest, who: &keel_auth::AuthInfo) -> Result<TxnResponse, Status> {
        if !mvcc_kv::txn_serializable(r) {
            self.server.linearizable_barrier().await.map_err(crate::errors::status)?;
        }
        keel_server::apply::check_txn(&self.server.auth(), who, r).map_err(errors::auth)?;
        // Planned under the store's read lock, values read after it, a big one on a blocking
        // thread (as Range): it holds back neither apply nor other requests.
        let planned = self.server.plan_txn_read(r).map_err(errors::kv)?;
        let mut resp = read_planned(planned.len(), move || planned.finish()).await?;
        let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        resp.header = self.server.header(rev);
        Ok(resp)
    }

    /// A checked range's key-values and header.
    async fn read_range(&self, r: &RangeRequest) -> Result<RangeResponse, Status> {
        // Planned under the store's read lock, values read after it (apply never waits long). A
        // big one is read on a blocking thread: decoding tens of MB would hold a runtime worker
        // from every other request for as long.
        let planned = self.server.plan_range(r).map_err(errors::kv)?;
        let mut resp = read_planned(planned.len(), move || planned.finish()).await?;
        let rev = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
        resp.header = self.server.header(rev);
        Ok(resp)
    }
}

/// Reads a planned read's values (`finish`) on a blocking thread when it has more than `limit`
/// key-values, on this task otherwise: decoding tens of MB would hold a runtime worker from every
/// other request for as long.
pub(crate) async fn read_planned_over<T: Send + 'static>(
    len: usize,
    limit: usize,
    finish: impl FnOnce() -> Result<T, keel_mvcc::KvError> + Send + 'static,
) -> Result<T, Status> {
    if len > limit { tokio::task::spawn_blocking(finish).await.map_err(|e| Status::internal(e.to_string()))? } else { finish() }
        .map_err(errors::kv)
}

/// [`read_planned_over`] with the limit of Range and read-only Txn.
async fn read_planned<T: Send + 'static>(
    len: usize,
    finish: impl FnOnce() -> Result<T, keel_mvcc::KvError> + Send + 'static,
) -> Result<T, Status> {
    read_planned_over(len, BIG_RANGE, finish).await
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: GrpcRequest<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        let r = req.into_inner();
        validate::range(&r)?;
        let started = std::time::Instant::now();
        let resp = async {
            if !r.serializable {
                self.server.not_learner().map_err(crate::errors::status)?;
                self.server.linearizable_barrier().await.map_err(crate::errors::status)?;
            }
            self.server.check_read(&who, &r.key, &r.range_end).map_err(crate::errors::status)?;
            let t0 = std::time::Instant::now();
            let resp = self.read_range(&r).await;
            let m = &keel_metrics::METRICS;
            m.ranges.inc();
            m.range_duration.with_label_values(&[if resp.is_ok() { "true" } else { "false" }]).observe(t0.elapsed().as_secs_f64());
            resp
        }
        .await;
        keel_metrics::observe_request("Range", resp.is_ok(), started.elapsed());
        resp.map(Response::new)
    }

    type RangeStreamStream = RangeStreamStream;

    async fn range_stream(&self, req: GrpcRequest<RangeRequest>) -> Result<Response<Self::RangeStreamStream>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        let r = req.into_inner();
        super::range_stream::check(&r)?;
        // etcd serves no stream but Snapshot on a learner.
        self.server.not_learner().map_err(crate::errors::status)?;
        if !r.serializable {
            self.server.linearizable_barrier().await.map_err(crate::errors::status)?;
        }
        self.server.check_read(&who, &r.key, &r.range_end).map_err(crate::errors::status)?;
        // One chunk waits to be taken at most: memory per stream is a chunk or two.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(super::range_stream::run(self.server.clone(), r, tx));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn put(&self, req: GrpcRequest<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        let r = req.into_inner();
        validate::put(&r)?;
        self.server.not_learner().map_err(crate::errors::status)?;
        self.server.check_quota(cost_put(&r)).await.map_err(crate::errors::status)?;
        match self.server.propose_as(Request::Put(r), &who).await.map_err(crate::errors::status)? {
            (Applied::Put(mut resp), rev) => {
                resp.header = self.server.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(&self, req: GrpcRequest<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        let r = req.into_inner();
        validate::delete_range(&r)?;
        self.server.not_learner().map_err(crate::errors::status)?;
        match self.server.propose_as(Request::DeleteRange(r), &who).await.map_err(crate::errors::status)? {
            (Applied::DeleteRange(mut resp), rev) => {
                resp.header = self.server.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: GrpcRequest<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        let r = req.into_inner();
        validate::txn(&r, self.server.cfg().max_txn_ops as usize)?;
        keel_metrics::METRICS.txns.inc();
        let serializable_reads = mvcc_kv::txn_is_read_only(&r) && mvcc_kv::txn_serializable(&r);
        if !serializable_reads {
            self.server.not_learner().map_err(crate::errors::status)?;
        }
        if mvcc_kv::txn_is_read_only(&r) {
            let t0 = std::time::Instant::now();
            let resp = self.read_only_txn(&r, &who).await;
            keel_metrics::observe_request("ReadonlyTxn", resp.is_ok(), t0.elapsed());
            return resp.map(Response::new);
        }
        self.server.check_quota(cost_txn(&r)).await.map_err(crate::errors::status)?;
        match self.server.propose_as(Request::Txn(r), &who).await.map_err(crate::errors::status)? {
            (Applied::Txn(mut resp), rev) => {
                resp.header = self.server.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn compact(&self, req: GrpcRequest<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let who = crate::api::caller(&self.server, &req)?;
        let r = req.into_inner();
        self.server.not_learner().map_err(crate::errors::status)?;
        let (physical, at) = (r.physical, r.revision);
        match self.server.propose_as(Request::Compaction(r), &who).await.map_err(crate::errors::status)? {
            (Applied::Compaction(mut resp), rev) => {
                if physical {
                    self.server.wait_compacted(at).await.map_err(crate::errors::status)?;
                }
                resp.header = self.server.header(rev);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }
}

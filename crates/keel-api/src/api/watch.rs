//! etcdserverpb.Watch: one bidirectional stream carries many watchers (create, cancel, progress).
//! Events come from the [`WatchHub`](keel_mvcc::watch::WatchHub); this module only speaks the
//! stream's protocol.

use keel_mvcc::watch::{Spec, WatchHandle, WatchHub};
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::watch_server::Watch;
use keel_proto::etcdserverpb::{WatchRequest, WatchResponse};
use keel_server::server::Server;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Responses buffered per stream; a watcher whose stream is full is caught up later.
const STREAM_BUFFER: usize = 1024;

/// etcd's cancel reason for a watch from a negative revision (`rpctypes.ErrCompacted`).
pub(crate) const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

pub struct WatchService {
    pub server: Arc<Server>,
    pub hub: Arc<WatchHub>,
    pub next_stream: AtomicU64,
    /// etcd's watch progress notify interval (10 minutes).
    pub progress_interval: std::time::Duration,
    /// Most watchers on one stream (`--max-watchers-per-stream`).
    pub max_watchers: usize,
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        // The stream's credentials, checked against each watcher's range when it is created.
        let (md, ext) = (req.metadata().clone(), req.extensions().clone());
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<WatchResponse>(STREAM_BUFFER);
        let stream_id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let hub = self.hub.clone();
        let server = self.server.clone();
        let interval = self.progress_interval;
        let max_watchers = self.max_watchers;
        tokio::spawn(async move {
            let streams = &keel_metrics::METRICS.watch_streams;
            streams.inc();
            let _counted = scopeguard::guard((), |_| streams.dec());
            let mut watchers: HashMap<i64, (WatchHandle, bool)> = HashMap::new();
            let mut next_id: i64 = 0;
            // Watchers that asked for periodic progress notifications.
            let mut progress_ids: Vec<i64> = Vec::new();
            let mut progress_tick = tokio::time::interval(interval);
            progress_tick.tick().await;
            loop {
                let r = tokio::select! {
                    m = input.message() => match m {
                        Ok(Some(r)) => r,
                        _ => break,
                    },
                    _ = progress_tick.tick() => {
                        progress_ids.retain(|id| watchers.contains_key(id));
                        for id in &progress_ids {
                            hub.progress(stream_id, &[*id], *id, &tx);
                        }
                        continue;
                    }
                };
                // Watchers the hub ended (compacted during their catch-up; their cancel response
                // is on its way) leave the stream: they count no more against its limit, and
                // its progress requests no longer wait for them.
                watchers.retain(|id, (h, prev)| {
                    if h.is_over() {
                        hub.cancel((stream_id, *id), h, *prev);
                    }
                    !h.is_over()
                });
                match r.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let id = if c.watch_id != 0 {
                            c.watch_id
                        } else {
                            while watchers.contains_key(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        };
                        let permitted = crate::api::auth_info(&server, &md, &ext)
                            .and_then(|who| server.check_read(&who, &c.key, &c.range_end).map_err(crate::errors::status));
                        // As etcd 3.6: a refused permission is reported with the gRPC error's
                        // text and watch ID -1.
                        let refused = if c.start_revision < 0 {
                            // As etcd 3.6: a negative start revision is older than any history.
                            Some((COMPACTED.to_string(), -1))
                        } else if watchers.contains_key(&id) || id < 0 {
                            Some(("etcdserver: watcher ID already exists".to_string(), id))
                        } else if watchers.len() >= max_watchers {
                            Some((format!("keel: too many watchers on this stream (--max-watchers-per-stream={max_watchers})"), -1))
                        } else {
                            permitted.err().map(|e| (format!("rpc error: code = {:?} desc = {}", e.code(), e.message()), -1))
                        };
                        if let Some((reason, watch_id)) = refused {
                            let rev = server.store().current_rev();
                            let resp = WatchResponse {
                                header: hub.header(rev),
                                watch_id,
                                created: true,
                                canceled: true,
                                cancel_reason: reason,
                                ..Default::default()
                            };
                            if tx.send(resp).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        let spec = Spec::from_create(&c);
                        if c.progress_notify {
                            progress_ids.push(id);
                        }
                        let prev = spec.prev_kv;
                        match hub.watch((stream_id, id), spec, c.start_revision, tx.clone()) {
                            Ok(h) => {
                                watchers.insert(id, (h, prev));
                            }
                            Err(resp) => {
                                if tx.send(resp).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    Some(RequestUnion::CancelRequest(c)) => {
                        if let Some((h, prev)) = watchers.remove(&c.watch_id) {
                            hub.cancel((stream_id, c.watch_id), &h, prev);
                            let rev = server.store().current_rev();
                            let resp =
                                WatchResponse { header: hub.header(rev), watch_id: c.watch_id, canceled: true, ..Default::default() };
                            if tx.send(resp).await.is_err() {
                                break;
                            }
                        }
                    }
                    Some(RequestUnion::ProgressRequest(_)) => {
                        // Only when every watcher of the stream is synced: progress never runs
                        // ahead of events still to be sent.
                        let ids: Vec<i64> = watchers.keys().copied().collect();
                        hub.progress(stream_id, &ids, -1, &tx);
                    }
                    None => {}
                }
            }
            for (id, (h, prev)) in watchers {
                hub.cancel((stream_id, id), &h, prev);
            }
        });
        Ok(Response::new(Box::pin(SendTimed { rx: ReceiverStream::new(rx), sending: None })))
    }
}

/// What a watch response is, for etcd 3.7's send-loop histograms.
#[derive(Clone, Copy)]
enum Sent {
    Events(usize),
    Control,
    Progress,
}

/// A watch stream's responses as the gRPC sender takes them, each timed from when the sender
/// takes it until it asks for the next (encoding it and handing it to the connection, waiting
/// for the client's flow control): etcd 3.7's send-loop histograms, by kind.
struct SendTimed {
    rx: ReceiverStream<WatchResponse>,
    sending: Option<(std::time::Instant, Sent)>,
}

impl futures::Stream for SendTimed {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        if let Some((t, kind)) = self.sending.take() {
            let m = &keel_metrics::METRICS;
            let took = t.elapsed().as_secs_f64();
            match kind {
                Sent::Events(n) => {
                    m.watch_send_events.observe(took);
                    m.watch_send_per_event.observe(took / n as f64);
                }
                Sent::Control => m.watch_send_control.observe(took),
                Sent::Progress => m.watch_send_progress.observe(took),
            }
        }
        let next = futures::Stream::poll_next(Pin::new(&mut self.rx), cx);
        if let std::task::Poll::Ready(Some(r)) = &next {
            let kind = if r.created || r.canceled {
                Sent::Control
            } else if !r.events.is_empty() {
                Sent::Events(r.events.len())
            } else {
                Sent::Progress
            };
            self.sending = Some((std::time::Instant::now(), kind));
        }
        next.map(|r| r.map(Ok))
    }
}

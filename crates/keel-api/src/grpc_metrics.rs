//! gRPC call metrics (go-grpc-prometheus' families, as etcd exports them): a middleware on the
//! gRPC routes that counts calls, messages and bytes by service and method and their final
//! codes, and logs slow unary calls as etcd does. The families live in keel-metrics.

use axum::body::{Body, Bytes};
use keel_metrics::{code_name, grpc_type, METRICS};
use std::pin::Pin;
use std::task::{Context, Poll};

fn status_of(h: &http::HeaderMap) -> Option<i32> {
    h.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// One gRPC call being observed: its labels and start.
#[derive(Clone)]
struct Call {
    kind: &'static str,
    service: String,
    method: String,
    start: std::time::Instant,
}

impl Call {
    fn labels(&self) -> [&str; 3] {
        [self.kind, &self.service, &self.method]
    }

    fn handled(&self, code: i32) {
        let [t, s, m] = self.labels();
        METRICS.grpc_handled.with_label_values(&[t, s, m, code_name(code)]).inc();
        let spent = self.start.elapsed();
        if t == "unary" && spent > keel_metrics::warn_unary() {
            // etcd's slow-request line.
            tracing::warn!(time_spent = ?spent, method = %format!("/{s}/{m}"), code = code_name(code), "request stats");
        }
        if keel_metrics::extensive() {
            METRICS.grpc_handling.with_label_values(&self.labels()).observe(self.start.elapsed().as_secs_f64());
        }
    }
}

/// Counts gRPC calls, their messages and bytes by service and method, and their final codes: a
/// middleware for the gRPC routes.
pub async fn grpc_layer(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return next.run(req).await;
    };
    let call = Call {
        kind: grpc_type(service, method),
        service: service.to_string(),
        method: method.to_string(),
        start: std::time::Instant::now(),
    };
    METRICS.grpc_started.with_label_values(&call.labels()).inc();
    // etcd's clients name their API version in the metadata; others count as "unknown".
    let api = req.headers().get("client-api-version").and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    let kind = if call.kind == "unary" { "unary" } else { "stream" };
    METRICS.client_requests.with_label_values(&[kind, api]).inc();
    let req = req.map(|b| Body::new(Framed::new(b, call.clone(), Direction::Received)));
    let resp = next.run(req).await;
    if let Some(code) = status_of(resp.headers()) {
        // A trailers-only response: the call ended with its headers.
        call.handled(code);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    axum::response::Response::from_parts(parts, Body::new(Framed::new(body, call, Direction::Sent)))
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Received,
    Sent,
}

/// A gRPC body that counts the length-prefixed messages passing through it (and their bytes);
/// on the response side it also reports the call's code from its trailers, or `Canceled` when
/// the client goes away before the end.
struct Framed {
    inner: Body,
    call: Call,
    dir: Direction,
    /// Header bytes still to read of the next message's 5-byte prefix, and those read.
    head: [u8; 5],
    head_len: usize,
    /// Body bytes of the current message still to pass.
    left: u64,
    done: bool,
}

impl Framed {
    fn new(inner: Body, call: Call, dir: Direction) -> Framed {
        Framed { inner, call, dir, head: [0; 5], head_len: 0, left: 0, done: false }
    }

    /// Follows the message framing across chunks: a message counts once its prefix is in.
    fn count(&mut self, mut data: &[u8]) {
        let bytes = if self.dir == Direction::Sent { &METRICS.grpc_sent_bytes } else { &METRICS.grpc_received_bytes };
        bytes.inc_by(data.len() as u64);
        while !data.is_empty() {
            if self.left > 0 {
                let n = (self.left as usize).min(data.len());
                self.left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.head_len).min(data.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
            self.head_len += n;
            data = &data[n..];
            if self.head_len == 5 {
                self.head_len = 0;
                self.left = u64::from(u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]));
                let c = if self.dir == Direction::Sent { &METRICS.grpc_msg_sent } else { &METRICS.grpc_msg_received };
                c.with_label_values(&self.call.labels()).inc();
            }
        }
    }

    fn finish(&mut self, code: i32) {
        if self.dir == Direction::Sent && !self.done {
            self.call.handled(code);
        }
        self.done = true;
    }
}

impl http_body::Body for Framed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let d = d.clone();
                    self.count(&d);
                } else if let Some(t) = f.trailers_ref() {
                    let code = status_of(t).unwrap_or(0);
                    self.finish(code);
                }
            }
            Poll::Ready(None) => self.finish(0),
            Poll::Ready(Some(Err(_))) => self.finish(2),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Framed {
    fn drop(&mut self) {
        self.finish(1);
    }
}

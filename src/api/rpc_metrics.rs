//! The RPC metrics of every call (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`), counted
//! around everything else, so refusals by the other layers count too.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http_body::Frame;
use tonic::{Status, body::Body};

use super::{
    gate::Gate,
    rpc::{Method, Rpc},
};
use crate::metrics::{HandledLabels, RpcLabels, grpc_code_name, metrics};

/// Counts each call when it starts and when its status is known.
#[derive(Debug, Clone, Copy)]
pub struct RpcMetrics;

impl RpcMetrics {
    /// Creates every method's series at zero, so that rates and alerts
    /// work from the start.
    pub fn new() -> Self {
        for method in Method::ALL {
            metrics().precreate_rpc(labels(method));
        }
        Self
    }
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The labels of `method`'s series: the server's own names, so a call's
/// labels need no allocation.
fn labels(method: Method) -> RpcLabels {
    RpcLabels {
        grpc_type: method.streaming().label(),
        grpc_service: method.service().name(),
        grpc_method: method.name(),
    }
}

impl Gate for RpcMetrics {
    /// `None` for a path that names no method the server has (as
    /// go-grpc-prometheus counts only registered methods), so that calls
    /// to made-up paths cannot make new series without end.
    type Pass = Option<Call>;

    fn check<B>(&self, rpc: &Rpc, _request: &mut http::Request<B>) -> Result<Self::Pass, Status> {
        let call = rpc.method().map(|method| Call {
            labels: labels(method),
            started: Instant::now(),
            span: tracing::Span::none(),
            done: false,
        });
        if let Some(call) = &call {
            metrics().rpc_started.get_or_create(&call.labels).inc();
        }
        Ok(call)
    }

    async fn answer<E, F>(_rpc: Rpc, call: Self::Pass, answer: F) -> Result<http::Response<Body>, E>
    where
        E: Send + 'static,
        F: Future<Output = Result<http::Response<Body>, E>> + Send + 'static,
    {
        // The call's span (see telemetry::request_span), to record the
        // status in; held until then.
        let call = call.map(|mut call| {
            call.span = tracing::Span::current();
            call
        });
        let response = match answer.await {
            Ok(response) => response,
            Err(error) => {
                if let Some(call) = call {
                    call.finish(UNKNOWN);
                }
                return Err(error);
            }
        };
        let Some(call) = call else {
            return Ok(response);
        };
        // An error before any message is a trailers-only answer: the
        // status is in the headers. Otherwise it comes in the trailers.
        if let Some(code) = grpc_status(response.headers()) {
            call.finish(code);
            return Ok(response);
        }
        Ok(response.map(|body| {
            Body::new(MeteredBody {
                inner: body,
                call: Some(call),
            })
        }))
    }
}

/// One call being counted; dropped before its status was known (the
/// client went away, its deadline passed, the connection closed), it counts
/// as `Canceled`.
#[derive(Debug)]
pub struct Call {
    labels: RpcLabels,
    started: Instant,
    span: tracing::Span,
    done: bool,
}

impl Call {
    fn finish(mut self, code: i32) {
        self.record(code);
    }

    fn record(&mut self, code: i32) {
        self.done = true;
        self.span.record("rpc.grpc.status_code", code);
        let metrics = metrics();
        metrics
            .rpc_seconds
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
        metrics
            .rpc_handled
            .get_or_create(&HandledLabels {
                grpc_type: self.labels.grpc_type,
                grpc_service: self.labels.grpc_service,
                grpc_method: self.labels.grpc_method,
                grpc_code: grpc_code_name(code),
            })
            .inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done {
            self.record(CANCELLED);
        }
    }
}

/// gRPC's UNKNOWN, for a call that ended without a status.
const UNKNOWN: i32 = 2;
/// gRPC's CANCELLED, for a call whose answer was dropped before its status.
const CANCELLED: i32 = 1;

/// The `grpc-status` in `headers`, if there is one.
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A response body that counts its call when the trailers go by; a body
/// dropped before them (the client went away) drops its call, which counts
/// as `Canceled`.
struct MeteredBody {
    inner: Body,
    call: Option<Call>,
}

impl http_body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(grpc_status),
            Poll::Ready(Some(Err(status))) => Some(Some(status.code() as i32)),
            // A body that ends without trailers carries no status.
            Poll::Ready(None) => Some(None),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(call) = this.call.take()
        {
            call.finish(code.unwrap_or(UNKNOWN));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

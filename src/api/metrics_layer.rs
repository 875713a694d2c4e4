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
use tonic::body::Body;
use tower::{Layer, Service};

use crate::metrics::{HandledLabels, RpcLabels, grpc_code_name, metrics, rpc_of_path};

/// Adds [`RpcMetrics`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// Counts each call when it starts and when its status is known.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = rpc_of_path(request.uri().path()).map(|(grpc_type, service, method)| Call {
            labels: RpcLabels {
                grpc_type,
                grpc_service: service,
                grpc_method: method,
            },
            started: Instant::now(),
            span: tracing::Span::none(),
            done: false,
        });
        if let Some(call) = &call {
            metrics().rpc_started.get_or_create(&call.labels).inc();
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
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
        })
    }
}

/// One call being counted; dropped before its status was known (the
/// client went away, its deadline passed, the connection closed), it counts
/// as `Canceled`.
struct Call {
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

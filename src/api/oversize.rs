//! A request larger than the server accepts answers `RESOURCE_EXHAUSTED`
//! (reason `REQUEST_TOO_LARGE`), as gRPC convention has it, rather than the
//! `OUT_OF_RANGE` tonic's framing gives. tonic refuses the message from its
//! length prefix, before reading the body, which is what keeps memory
//! bounded; this layer only rewrites the answer.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use super::{ServiceError, reply};

/// The start of tonic's message for a length prefix past the limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Adds [`RewriteOversize`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RewriteOversizeLayer;

impl<S> Layer<S> for RewriteOversizeLayer {
    type Service = RewriteOversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RewriteOversize { inner }
    }
}

/// Turns tonic's `OUT_OF_RANGE` for an oversized request into
/// `RESOURCE_EXHAUSTED`, with the limit in the message.
#[derive(Debug, Clone)]
pub struct RewriteOversize<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for RewriteOversize<S>
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
        let path = request.uri().path().to_owned();
        let answer = self.inner.call(request);
        Box::pin(async move { Ok(rewrite(&path, answer.await?)) })
    }
}

fn rewrite(path: &str, response: http::Response<Body>) -> http::Response<Body> {
    // An error before any message is a trailers-only answer: the status is
    // in the headers.
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != Code::OutOfRange || !status.message().starts_with(TONIC_TOO_LARGE) {
        return response;
    }
    let limit = status
        .message()
        .rsplit_once("the limit is: ")
        .map_or("the server's limit", |(_, limit)| limit);
    reply::refuse(path, ServiceError::TooLarge(limit.to_owned()), None).into_http()
}

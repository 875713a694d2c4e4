//! The layer that reads `idempotency-key` before any work is done, and
//! sends a replay's stored response as stored (see [`reply::send_stored`]).
//!
//! It is a tower layer rather than a `tonic::Interceptor` because only
//! CreateTask needs a key: GetTask and ListTasks ignore it, and a tonic
//! interceptor cannot see which method is called.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use oncely_client::metadata::IDEMPOTENCY_KEY;
use tonic::{body::Body, server::NamedService};
use tower::{Layer, Service};

use super::{ServiceError, reply};
use crate::{
    idempotency::{IdempotencyKey, KeyError, MissingKeyPolicy},
    metrics::metrics,
};

/// The methods that need a key, by HTTP/2 path.
const KEYED_PATHS: &[&str] = &["/tasks.v1.TaskService/CreateTask"];

/// Adds [`RequireIdempotencyKey`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequireIdempotencyKeyLayer {
    missing_key: MissingKeyPolicy,
}

impl RequireIdempotencyKeyLayer {
    /// A layer that treats a missing key as `missing_key` says; malformed
    /// keys are always refused.
    pub fn new(missing_key: MissingKeyPolicy) -> Self {
        Self { missing_key }
    }
}

impl<S> Layer<S> for RequireIdempotencyKeyLayer {
    type Service = RequireIdempotencyKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireIdempotencyKey {
            inner,
            missing_key: self.missing_key,
        }
    }
}

/// For keyed methods, parses `idempotency-key` into an [`IdempotencyKey`] in
/// the request's extensions, or answers INVALID_ARGUMENT without calling the
/// service.
#[derive(Debug, Clone)]
pub struct RequireIdempotencyKey<S> {
    inner: S,
    missing_key: MissingKeyPolicy,
}

impl<S: NamedService> NamedService for RequireIdempotencyKey<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for RequireIdempotencyKey<S>
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if KEYED_PATHS.contains(&request.uri().path()) {
            let refusal = match key_from_headers(request.headers()) {
                Ok(Some(key)) => {
                    request.extensions_mut().insert(key);
                    None
                }
                // Deduplicated by fingerprint in the service.
                Ok(None) if self.missing_key == MissingKeyPolicy::Fingerprint => None,
                // No rule applied to a request without a key.
                Ok(None) => Some((ServiceError::KeyMissing, None)),
                Err(error) => Some((error, Some("header"))),
            };
            if let Some((error, source)) = refusal {
                // A CreateTask refused for its key; "none": it had none.
                metrics().count_create(error.outcome(), source.unwrap_or("none"));
                let response = reply::refuse(request.uri().path(), error, source).into_http();
                return Box::pin(async move { Ok(response) });
            }
        }
        // A replay's stored bytes replace the body tonic encoded.
        let call = self.inner.call(request);
        Box::pin(async move { call.await.map(reply::send_stored) })
    }
}

/// The request's key: `None` when it has none, an error when it is malformed.
fn key_from_headers(headers: &http::HeaderMap) -> Result<Option<IdempotencyKey>, ServiceError> {
    let values = headers.get_all(IDEMPOTENCY_KEY);
    let Some(first) = values.iter().next() else {
        return Ok(None);
    };
    // Two keys leave it ambiguous which one the client reuses on retry.
    let count = values.iter().count();
    if count > 1 {
        return Err(KeyError::Repeated(count).into());
    }
    Ok(Some(IdempotencyKey::parse(first.as_bytes())?))
}

//! The gate that reads `idempotency-key` before any work is done, and
//! sends a replay's stored response as stored (see [`reply::send_stored`]).
//!
//! It is a gate of the stack rather than a `tonic::Interceptor` because
//! only CreateTask needs a key: GetTask and ListTasks ignore it, and a tonic
//! interceptor cannot see which method is called.

use std::future::Future;

use oncely_client::metadata::{IDEMPOTENCY_FALLBACK, IDEMPOTENCY_KEY};
use tonic::{Status, body::Body};

use super::{
    ServiceError,
    gate::Gate,
    reply,
    rpc::{Method, Rpc},
};
use crate::{
    idempotency::{FingerprintAsked, IdempotencyKey, IdempotencyKeyError, MissingKeyPolicy},
    metrics::metrics,
};

/// For CreateTask, parses `idempotency-key` into an [`IdempotencyKey`] in
/// the request's extensions, or answers INVALID_ARGUMENT without calling
/// the service.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdempotencyKeyGate {
    missing_key: MissingKeyPolicy,
}

impl IdempotencyKeyGate {
    /// A gate that treats a missing key as `missing_key` says; malformed
    /// keys are always refused.
    pub fn new(missing_key: MissingKeyPolicy) -> Self {
        Self { missing_key }
    }
}

impl Gate for IdempotencyKeyGate {
    type Pass = ();

    fn check<B>(&self, rpc: &Rpc, request: &mut http::Request<B>) -> Result<(), Status> {
        if !rpc.is(Method::CreateTask) {
            return Ok(());
        }
        let (error, source) = match key_from_headers(request.headers()) {
            Ok(Some(key)) => {
                request.extensions_mut().insert(key);
                return Ok(());
            }
            // Deduplicated by fingerprint in the service, by the policy or
            // because the caller asked.
            Ok(None) => match fallback_asked(request.headers()) {
                Ok(true) => {
                    request.extensions_mut().insert(FingerprintAsked);
                    return Ok(());
                }
                Ok(false) if self.missing_key == MissingKeyPolicy::Fingerprint => return Ok(()),
                // No rule applied to a request without a key.
                Ok(false) => (ServiceError::KeyMissing, None),
                Err(error) => (error, None),
            },
            Err(error) => (error, Some("header")),
        };
        // A CreateTask refused for its key; "none": it had none.
        metrics().count_create(error.outcome(), source.unwrap_or("none"));
        Err(reply::refuse(rpc, error, source))
    }

    async fn answer<E, F>(_rpc: Rpc, (): (), answer: F) -> Result<http::Response<Body>, E>
    where
        E: Send + 'static,
        F: Future<Output = Result<http::Response<Body>, E>> + Send + 'static,
    {
        // A replay's stored bytes replace the body tonic encoded.
        answer.await.map(reply::send_stored)
    }
}

/// Whether a keyless request asked to be deduplicated by fingerprint with
/// `idempotency-fallback: fingerprint`; an error for any other value.
fn fallback_asked(headers: &http::HeaderMap) -> Result<bool, ServiceError> {
    let mut values = headers.get_all(IDEMPOTENCY_FALLBACK).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(false),
        (Some(value), None) if value.as_bytes().eq_ignore_ascii_case(b"fingerprint") => Ok(true),
        _ => Err(IdempotencyKeyError::UnknownFallback.into()),
    }
}

/// The request's key: `None` when it has none, an error when it is malformed.
pub(crate) fn key_from_headers(
    headers: &http::HeaderMap,
) -> Result<Option<IdempotencyKey>, ServiceError> {
    let values = headers.get_all(IDEMPOTENCY_KEY);
    let Some(first) = values.iter().next() else {
        return Ok(None);
    };
    // Two keys leave it ambiguous which one the client reuses on retry.
    let count = values.iter().count();
    if count > 1 {
        return Err(IdempotencyKeyError::Repeated(count).into());
    }
    Ok(Some(IdempotencyKey::parse(first.as_bytes())?))
}

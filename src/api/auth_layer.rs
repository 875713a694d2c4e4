//! The layer that lets a call in only with a valid API key of a role that
//! may call its service, and hands the caller (a [`Principal`]) to the
//! service in the request's extensions. Health and reflection stay open.
//! While the key ring does not require keys, every call passes as before.
//!
//! Refusals for a missing or unknown key are rate limited per peer address
//! (`FAILURES_PER_SECOND`, bursts of `FAILURE_BURST`): past it, a peer that
//! keeps guessing gets `RESOURCE_EXHAUSTED` with `RetryInfo`, and no log
//! line, so guessing costs neither CPU nor log space without bound.

use std::{
    future::Future,
    net::IpAddr,
    num::NonZeroU32,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tonic::body::Body;
use tower::{Layer, Service};

use super::{ServiceError, connection::peer_ip, reply};
use crate::{
    auth::KeyRing,
    domain::{Principal, Role},
};

/// The metadata that carries the key.
const AUTHORIZATION: &str = "authorization";

/// How many calls without a valid key a peer may make per second.
const FAILURES_PER_SECOND: NonZeroU32 = NonZeroU32::new(10).expect("non-zero");
/// How many such calls a peer may make at once beyond the rate.
const FAILURE_BURST: NonZeroU32 = NonZeroU32::new(50).expect("non-zero");

/// Adds [`RequireApiKey`] around a service.
#[derive(Debug, Clone)]
pub struct RequireApiKeyLayer {
    ring: KeyRing,
    failures: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

impl RequireApiKeyLayer {
    /// A layer that checks calls against `ring`.
    pub fn new(ring: KeyRing) -> Self {
        Self {
            ring,
            failures: Arc::new(RateLimiter::keyed(
                Quota::per_second(FAILURES_PER_SECOND).allow_burst(FAILURE_BURST),
            )),
        }
    }

    /// Forgets peers whose buckets are full again; call it now and then.
    pub fn forget_idle_peers(&self) {
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
    }
}

impl<S> Layer<S> for RequireApiKeyLayer {
    type Service = RequireApiKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireApiKey {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RequireApiKeyLayer`].
#[derive(Debug, Clone)]
pub struct RequireApiKey<S> {
    inner: S,
    layer: RequireApiKeyLayer,
}

/// The roles that may call the service of `path`; `None` for open services
/// (health, reflection) and paths no service answers.
fn allowed_roles(path: &str) -> Option<&'static [Role]> {
    let service = path.trim_start_matches('/').split('/').next()?;
    match service {
        "tasks.v1.TaskService" => Some(&[Role::Agent, Role::Admin]),
        "tasks.v1.WorkerService" => Some(&[Role::Worker, Role::Admin]),
        "tasks.v1.Admin" => Some(&[Role::Admin]),
        _ => None,
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `principal` may call `path`; the refusal if not.
fn admit(principal: &Principal, path: &str, roles: &[Role]) -> Result<(), ServiceError> {
    if roles.contains(&principal.role) {
        return Ok(());
    }
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or(path);
    Err(ServiceError::PermissionDenied(format!(
        "the key {:?} has the role {}, which may not call {service}",
        principal.name, principal.role
    )))
}

impl<S, B> Service<http::Request<B>> for RequireApiKey<S>
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
        let path = request.uri().path().to_owned();
        let ring = &self.layer.ring;
        if let Some(roles) = allowed_roles(&path).filter(|_| ring.required()) {
            let checked = ring
                .authenticate(bearer(request.headers()))
                .map_err(ServiceError::Unauthenticated)
                .and_then(|principal| admit(&principal, &path, roles).map(|()| principal));
            match checked {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                }
                Err(error @ ServiceError::Unauthenticated(_)) => {
                    let limited =
                        peer_ip(&request).and_then(|ip| self.layer.failures.check_key(&ip).err());
                    let response = match limited {
                        // Quietly: a flood of guesses must not flood the log.
                        Some(not_until) => tonic::Status::from(ServiceError::RateLimited(
                            not_until.wait_time_from(DefaultClock::default().now()),
                        ))
                        .into_http(),
                        None => reply::refuse(&path, error, None).into_http(),
                    };
                    return Box::pin(async move { Ok(response) });
                }
                Err(error) => {
                    let response = reply::refuse(&path, error, None).into_http();
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_its_roles_and_the_rest_is_open() {
        assert_eq!(
            allowed_roles("/tasks.v1.Admin/Cleanup"),
            Some(&[Role::Admin][..])
        );
        assert!(allowed_roles("/tasks.v1.TaskService/CreateTask").is_some());
        assert!(allowed_roles("/grpc.health.v1.Health/Check").is_none());
        assert!(
            allowed_roles("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").is_none()
        );
    }

    #[test]
    fn only_bearer_tokens_are_read() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(AUTHORIZATION, "Bearer oncely_abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("oncely_abc"));
        headers.insert(AUTHORIZATION, "bearer  oncely_abc ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("oncely_abc"));
        headers.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}

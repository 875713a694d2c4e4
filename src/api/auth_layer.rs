//! The layer that lets a call in only with a valid API key of a role that
//! may call its service, and hands the caller (a [`Principal`]) to the
//! service in the request's extensions. Health and reflection stay open.
//! While the key ring does not require keys, every call passes as before.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::body::Body;
use tower::{Layer, Service};

use super::{ServiceError, reply};
use crate::{
    auth::KeyRing,
    domain::{Principal, Role},
};

/// The metadata that carries the key.
const AUTHORIZATION: &str = "authorization";

/// Adds [`RequireApiKey`] around a service.
#[derive(Debug, Clone)]
pub struct RequireApiKeyLayer {
    ring: KeyRing,
}

impl RequireApiKeyLayer {
    /// A layer that checks calls against `ring`.
    pub fn new(ring: KeyRing) -> Self {
        Self { ring }
    }
}

impl<S> Layer<S> for RequireApiKeyLayer {
    type Service = RequireApiKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireApiKey {
            inner,
            ring: self.ring.clone(),
        }
    }
}

/// See [`RequireApiKeyLayer`].
#[derive(Debug, Clone)]
pub struct RequireApiKey<S> {
    inner: S,
    ring: KeyRing,
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
        if let Some(roles) = allowed_roles(&path).filter(|_| self.ring.required()) {
            let checked = self
                .ring
                .authenticate(bearer(request.headers()))
                .map_err(ServiceError::Unauthenticated)
                .and_then(|principal| admit(&principal, &path, roles).map(|()| principal));
            match checked {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
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

//! The gate that lets a call in only with a valid API key of a role that
//! may call its service, and hands the caller (a [`Principal`]) to the
//! service in the request's extensions. Health and reflection stay open.
//! While the key ring does not require keys, every call passes as before.
//!
//! Refusals for a missing or unknown key are rate limited per peer address
//! (`FAILURES_PER_SECOND`, bursts of `FAILURE_BURST`): past it, a peer that
//! keeps guessing gets `RESOURCE_EXHAUSTED` with `RetryInfo`, and no log
//! line, so guessing costs neither CPU nor log space without bound.

use std::{net::IpAddr, num::NonZeroU32, sync::Arc};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tonic::Status;

use super::{
    ServiceError,
    connection::peer_ip,
    gate::Gate,
    reply,
    rpc::{Rpc, Service},
};
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

/// Lets a call in only with a valid API key of a role that may call its
/// service, and puts the caller's [`Principal`] in its extensions.
#[derive(Debug, Clone)]
pub struct ApiKeyGate {
    ring: KeyRing,
    failures: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

impl ApiKeyGate {
    /// A gate that checks calls against `ring`.
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

    /// The refusal of a call without a valid key: quietly rate limited
    /// per peer past `FAILURES_PER_SECOND`.
    fn refuse_unauthenticated<B>(
        &self,
        rpc: &Rpc,
        request: &http::Request<B>,
        error: ServiceError,
    ) -> Status {
        match self.guessing(peer_ip(request)) {
            // Quietly: a flood of guesses must not flood the log.
            Some(limited) => Status::from(limited),
            None => reply::refuse(rpc, error, None),
        }
    }

    /// `RateLimited` when `peer` has made more calls without a valid key
    /// than it may; counts this one.
    fn guessing(&self, peer: Option<IpAddr>) -> Option<ServiceError> {
        let not_until = peer.and_then(|ip| self.failures.check_key(&ip).err())?;
        Some(ServiceError::RateLimited(
            not_until.wait_time_from(DefaultClock::default().now()),
        ))
    }

    /// The door of another surface over HTTP that only `roles` may use
    /// (MCP's `/mcp`: agent keys), by the same rules as a call: the caller
    /// of a request with `headers` from `peer`, `None` while keys are not
    /// required; a peer guessing keys is rate limited as on every surface.
    pub fn admit_http(
        &self,
        headers: &http::HeaderMap,
        peer: Option<IpAddr>,
        surface: &str,
        roles: &[Role],
    ) -> Result<Option<Principal>, ServiceError> {
        if !self.ring.required() {
            return Ok(None);
        }
        match self.ring.authenticate(bearer(headers)) {
            Ok(principal) => admit(&principal, surface, roles).map(|()| Some(principal)),
            Err(error) => Err(self
                .guessing(peer)
                .unwrap_or(ServiceError::Unauthenticated(error))),
        }
    }
}

/// The caller this gate let in (`None` while keys are not required) and
/// the message, for the services.
pub(super) fn caller_and_message<T>(request: tonic::Request<T>) -> (Option<Principal>, T) {
    let (_, mut extensions, message) = request.into_parts();
    (extensions.remove::<Principal>(), message)
}

/// The roles that may call `service`; `None` for open services (health,
/// reflection) and paths no service answers.
fn allowed_roles(service: Option<Service>) -> Option<&'static [Role]> {
    match service? {
        Service::Tasks => Some(&[Role::Agent, Role::Admin]),
        Service::Workers => Some(&[Role::Worker, Role::Admin]),
        Service::Admin => Some(&[Role::Admin]),
        Service::Health | Service::Reflection | Service::ReflectionV1Alpha => None,
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme is
/// case-blind, as HTTP's are).
fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `principal` may call `service`; the refusal if not.
fn admit(principal: &Principal, service: &str, roles: &[Role]) -> Result<(), ServiceError> {
    if roles.contains(&principal.role) {
        return Ok(());
    }
    Err(ServiceError::PermissionDenied(format!(
        "the key {:?} has the role {}, which may not call {service}",
        principal.name, principal.role
    )))
}

impl Gate for ApiKeyGate {
    type Pass = ();

    fn check<B>(&self, rpc: &Rpc, request: &mut http::Request<B>) -> Result<(), Status> {
        let Some((service, roles)) = rpc
            .service()
            .zip(allowed_roles(rpc.service()))
            .filter(|_| self.ring.required())
        else {
            return Ok(());
        };
        let checked = self
            .ring
            .authenticate(bearer(request.headers()))
            .map_err(ServiceError::Unauthenticated)
            .and_then(|principal| admit(&principal, service.name(), roles).map(|()| principal));
        match checked {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                Ok(())
            }
            Err(error @ ServiceError::Unauthenticated(_)) => {
                Err(self.refuse_unauthenticated(rpc, request, error))
            }
            Err(error) => Err(reply::refuse(rpc, error, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_its_roles_and_the_rest_is_open() {
        assert_eq!(
            allowed_roles(Some(Service::Admin)),
            Some(&[Role::Admin][..])
        );
        assert!(allowed_roles(Some(Service::Tasks)).is_some());
        assert!(allowed_roles(Some(Service::Health)).is_none());
        assert!(allowed_roles(Some(Service::Reflection)).is_none());
        assert!(allowed_roles(None).is_none());
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

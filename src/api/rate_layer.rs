//! Rate limits and load shedding, after authentication: each caller (an API
//! key, or without keys the peer's address) gets a token bucket of
//! `RATE_LIMIT` calls per second with bursts of `RATE_BURST`, and the server
//! takes at most `MAX_IN_FLIGHT` calls at once, at most
//! `MAX_IN_FLIGHT_PER_CALLER` of them from one caller (so that one caller's
//! long polls cannot take every place). Past any of these, the call is
//! answered `RESOURCE_EXHAUSTED` at once, with `RetryInfo` saying when to
//! come back, rather than queued without bound. A call holds its places
//! until its answer has been sent, so the bounds cover answers waiting for
//! a slow reader too; and answers hold at most `MAX_ANSWER_BYTES` in all
//! until they are sent. Health and reflection are exempt.

use std::{
    collections::HashMap,
    future::Future,
    num::NonZeroU32,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};

use super::{
    ServiceError,
    connection::{hold_until_sent, peer_ip},
    reply::{self, AnswerSize},
};
use crate::domain::Principal;

/// The one call whose answer is never dropped to shed load.
const LEASE_TASKS_PATH: &str = "/tasks.v1.WorkerService/LeaseTasks";

/// How long a shed call is asked to wait before coming back.
const SHED_RETRY: Duration = Duration::from_secs(1);

/// The limits, from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Calls per second per caller; `None` for no limit.
    pub per_second: Option<NonZeroU32>,
    /// How many calls a caller may make at once above the rate.
    pub burst: NonZeroU32,
    /// The most calls the server works on at once.
    pub max_in_flight: usize,
    /// The most calls one caller may have open at once.
    pub max_in_flight_per_caller: usize,
    /// The most bytes of answers held at once, from when they are made
    /// until they are sent.
    pub max_answer_bytes: usize,
}

/// Adds [`RateLimit`] around a service.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    in_flight: Arc<Semaphore>,
    callers: Arc<OpenCalls>,
    answer_bytes: Arc<Semaphore>,
    max_answer_bytes: u32,
}

/// How many calls each caller has open.
#[derive(Debug)]
struct OpenCalls {
    limit: usize,
    by_caller: Mutex<HashMap<String, usize>>,
}

impl OpenCalls {
    /// A place for one more call of `caller`, or how many it has open.
    fn enter(self: &Arc<Self>, caller: String) -> Result<CallerPlace, usize> {
        let mut by_caller = self
            .by_caller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = by_caller.entry(caller.clone()).or_default();
        if *open >= self.limit {
            return Err(*open);
        }
        *open += 1;
        Ok(CallerPlace {
            calls: Arc::clone(self),
            caller,
        })
    }
}

/// One open call of a caller, given back on drop.
#[derive(Debug)]
struct CallerPlace {
    calls: Arc<OpenCalls>,
    caller: String,
}

impl Drop for CallerPlace {
    fn drop(&mut self) {
        let mut by_caller = self
            .calls
            .by_caller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = by_caller.get_mut(&self.caller) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                by_caller.remove(&self.caller);
            }
        }
    }
}

impl RateLimitLayer {
    /// A layer enforcing `limits`.
    pub fn new(limits: RateLimits) -> Self {
        let limiter = limits.per_second.map(|rate| {
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(limits.burst),
            ))
        });
        Self {
            limiter,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            answer_bytes: Arc::new(Semaphore::new(limits.max_answer_bytes)),
            max_answer_bytes: u32::try_from(limits.max_answer_bytes).unwrap_or(u32::MAX),
            callers: Arc::new(OpenCalls {
                limit: limits.max_in_flight_per_caller,
                by_caller: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Forgets callers whose buckets are full again, so the table of
    /// callers does not grow without bound; call it now and then.
    pub fn forget_idle_callers(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RateLimitLayer`].
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

/// Who a call counts against: its API key, or its peer's address.
fn caller<B>(request: &http::Request<B>) -> String {
    if let Some(principal) = request.extensions().get::<Principal>() {
        return format!("key:{}", principal.name);
    }
    peer_ip(request).map_or_else(|| "peer:unknown".to_owned(), |ip| format!("peer:{ip}"))
}

/// Whether the limits apply to `path`: not to health and reflection.
fn limited(path: &str) -> bool {
    path.starts_with("/tasks.v1.")
}

impl<S, B> Service<http::Request<B>> for RateLimit<S>
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
        if !limited(&path) {
            return Box::pin(self.inner.call(request));
        }
        let caller = caller(&request);
        if let Some(limiter) = &self.layer.limiter
            && let Err(not_until) = limiter.check_key(&caller)
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let response = reply::refuse(&path, ServiceError::RateLimited(wait), None).into_http();
            return Box::pin(async move { Ok(response) });
        }
        let Ok(permit) = self.layer.in_flight.clone().try_acquire_owned() else {
            let response =
                reply::refuse(&path, ServiceError::Overloaded(SHED_RETRY), None).into_http();
            return Box::pin(async move { Ok(response) });
        };
        let place = match self.layer.callers.enter(caller) {
            Ok(place) => place,
            Err(open) => {
                let response =
                    reply::refuse(&path, ServiceError::CallerBusy(open, SHED_RETRY), None)
                        .into_http();
                return Box::pin(async move { Ok(response) });
            }
        };
        let answer = self.inner.call(request);
        let answer_bytes = self.layer.answer_bytes.clone();
        let max_answer_bytes = self.layer.max_answer_bytes;
        Box::pin(async move {
            let response = answer.await?;
            // The answer's bytes count until they are sent; one answer may
            // take the whole allowance. Leases are sent whatever the count:
            // dropping one would strand its tasks until their leases ran out.
            let size = response
                .extensions()
                .get::<AnswerSize>()
                .map_or(0, |size| u32::try_from(size.0).unwrap_or(u32::MAX))
                .min(max_answer_bytes);
            let bytes = match answer_bytes.try_acquire_many_owned(size) {
                Ok(bytes) => Some(bytes),
                Err(_) if path == LEASE_TASKS_PATH => None,
                Err(_) => {
                    return Ok(
                        reply::refuse(&path, ServiceError::Overloaded(SHED_RETRY), None)
                            .into_http(),
                    );
                }
            };
            Ok(hold_until_sent(response, (permit, place, bytes)))
        })
    }
}

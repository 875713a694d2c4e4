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
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use super::{
    ServiceError,
    connection::peer_ip,
    gate::{Gate, hold_until_sent},
    reply::{self, AnswerSize},
    rpc::{Method, Rpc},
};
use crate::domain::Principal;

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

/// Refuses calls past the limits; see the module.
#[derive(Debug, Clone)]
pub struct RateGate {
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

impl RateGate {
    /// A gate enforcing `limits`.
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

/// Who a call counts against: its API key, or its peer's address.
fn caller<B>(request: &http::Request<B>) -> String {
    if let Some(principal) = request.extensions().get::<Principal>() {
        return format!("key:{}", principal.name);
    }
    peer_ip(request).map_or_else(|| "peer:unknown".to_owned(), |ip| format!("peer:{ip}"))
}

/// What a call that passed the limits holds until its answer is sent.
#[derive(Debug)]
pub struct Places {
    /// Its place among the calls the server works on.
    _permit: OwnedSemaphorePermit,
    /// Its place among its caller's open calls.
    _place: CallerPlace,
    /// The answers' allowance, to take the answer's bytes from.
    answer_bytes: Arc<Semaphore>,
    /// The most bytes one answer takes of the allowance.
    max_answer_bytes: u32,
}

impl Gate for RateGate {
    /// `None` for calls the limits do not apply to: health and reflection.
    type Pass = Option<Places>;

    fn check<B>(&self, rpc: &Rpc, request: &mut http::Request<B>) -> Result<Self::Pass, Status> {
        if !rpc.is_api() {
            return Ok(None);
        }
        let caller = caller(request);
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check_key(&caller)
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(reply::refuse(rpc, ServiceError::RateLimited(wait), None));
        }
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            return Err(reply::refuse(
                rpc,
                ServiceError::Overloaded(SHED_RETRY),
                None,
            ));
        };
        let place = self
            .callers
            .enter(caller)
            .map_err(|open| reply::refuse(rpc, ServiceError::CallerBusy(open, SHED_RETRY), None))?;
        Ok(Some(Places {
            _permit: permit,
            _place: place,
            answer_bytes: Arc::clone(&self.answer_bytes),
            max_answer_bytes: self.max_answer_bytes,
        }))
    }

    async fn answer<E, F>(
        rpc: Rpc,
        places: Self::Pass,
        answer: F,
    ) -> Result<http::Response<Body>, E>
    where
        E: Send + 'static,
        F: Future<Output = Result<http::Response<Body>, E>> + Send + 'static,
    {
        let response = answer.await?;
        let Some(places) = places else {
            return Ok(response);
        };
        // The answer's bytes count until they are sent; one answer may
        // take the whole allowance. Leases are sent whatever the count:
        // dropping one would strand its tasks until their leases ran out.
        let size = response
            .extensions()
            .get::<AnswerSize>()
            .map_or(0, |size| u32::try_from(size.0).unwrap_or(u32::MAX))
            .min(places.max_answer_bytes);
        let bytes = match Arc::clone(&places.answer_bytes).try_acquire_many_owned(size) {
            Ok(bytes) => Some(bytes),
            Err(_) if rpc.is(Method::LeaseTasks) => None,
            Err(_) => {
                return Ok(
                    reply::refuse(&rpc, ServiceError::Overloaded(SHED_RETRY), None).into_http(),
                );
            }
        };
        Ok(hold_until_sent(response, (places, bytes)))
    }
}

//! Retries: which failures may pass next time, how long to wait between
//! attempts, and the loop that both [`OncelyClient`](crate::OncelyClient)
//! and [`Worker`](crate::Worker) run their calls in.
//!
//! Transient failures are `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `ABORTED`,
//! `CANCELLED`, and connections that broke before an answer arrived; the
//! wait before the next attempt is exponential with full jitter, and never
//! shorter than the server's `RetryInfo`. Everything else is returned at
//! once: `INVALID_ARGUMENT` and `FAILED_PRECONDITION` in particular mean the
//! request must change, and `UNAUTHENTICATED` and `PERMISSION_DENIED` that
//! the API key must.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tonic::{Code, Response, Status};
use tonic_types::StatusExt;

use crate::ClientError;

/// How hard to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The most attempts, the first included (at least 1).
    pub max_attempts: u32,
    /// The backoff ceiling before the second attempt; it doubles each time.
    pub initial_backoff: Duration,
    /// The largest backoff ceiling.
    pub max_backoff: Duration,
    /// The deadline of one attempt.
    pub attempt_timeout: Duration,
    /// The most time all attempts and waits together may take.
    pub total_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether a failed attempt may succeed if repeated unchanged. Refusals of
/// the API key (`UNAUTHENTICATED`, `PERMISSION_DENIED`) are not: the same
/// key is refused again.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        // CANCELLED: the server gave up on the deadline, or the call was cut;
        // repeating it with the same key is always safe.
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => true,
        // A rate limit or a shed call says when to come back; a request
        // that is simply too large does not, and would fail again.
        Code::ResourceExhausted => status.get_details_retry_info().is_some(),
        // A status with a source was made on this side from a transport
        // error (a connection that broke before the answer arrived), not
        // sent by the server.
        Code::Unknown | Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// Full jitter: a random wait up to the exponential ceiling for the
/// `attempts`-th failure in a row, but never less than the server's
/// `RetryInfo` delay. For callers that run their own loop (oncely's MCP
/// bridge); the client's calls use it already.
pub fn backoff(policy: &RetryPolicy, attempts: u32, status: &Status) -> Duration {
    let exponent = attempts.saturating_sub(1).min(16);
    let ceiling = policy
        .initial_backoff
        .saturating_mul(1 << exponent)
        .min(policy.max_backoff);
    let jitter = ceiling.mul_f64(fastrand::f64());
    let asked = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_default();
    jitter.max(asked)
}

/// Runs `attempt` on a clone of `client` until it succeeds, fails for good,
/// or the policy's attempts or time run out. `attempt` gets the deadline to
/// set on its request. Returns the response and the attempts made.
pub(crate) async fn with_retries<C, T, F, Fut>(
    policy: &RetryPolicy,
    method: &'static str,
    client: &C,
    mut attempt: F,
) -> Result<(Response<T>, u32), ClientError>
where
    C: Clone,
    F: FnMut(C, Duration) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let deadline = Instant::now() + policy.total_timeout;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let limit = policy.attempt_timeout.min(remaining);
        // The gRPC deadline covers the wait for the response headers; this
        // bounds the whole attempt, body and trailers included.
        let status = match tokio::time::timeout(limit, attempt(client.clone(), limit)).await {
            Ok(Ok(response)) => return Ok((response, attempts)),
            Ok(Err(status)) => status,
            Err(_) => Status::deadline_exceeded("the attempt timed out"),
        };
        if !is_transient(&status) {
            return Err(ClientError::Rejected(status));
        }
        let wait = backoff(policy, attempts, &status);
        if attempts >= policy.max_attempts.max(1) || Instant::now() + wait >= deadline {
            return Err(ClientError::GaveUp {
                attempts,
                last: status,
            });
        }
        tracing::debug!(method, attempts, ?wait, code = ?status.code(), "retrying");
        tokio::time::sleep(wait).await;
    }
}

/// One attempt of a call that is not retried here: its response, or its
/// error, with `limit` bounding the whole attempt (body and trailers too).
pub(crate) async fn attempt_once<T, Fut>(limit: Duration, call: Fut) -> Result<T, Status>
where
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("the attempt timed out")),
    }
}

/// A `std` duration as a `google.protobuf.Duration`, saturating at the
/// largest one (no duration this crate sends comes near it).
pub(crate) fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn resource_exhausted_is_retried_only_when_the_server_says_when() {
        let mut details = tonic_types::ErrorDetails::new();
        details.set_retry_info(Some(Duration::from_millis(300)));
        let limited = Status::with_error_details(Code::ResourceExhausted, "slow down", details);
        assert!(is_transient(&limited));
        assert!(!is_transient(&Status::resource_exhausted("too large")));
    }

    #[test]
    fn only_transient_codes_are_retried() {
        assert!(is_transient(&Status::unavailable("down")));
        assert!(is_transient(&Status::aborted("in progress")));
        assert!(is_transient(&Status::deadline_exceeded("slow")));
        assert!(is_transient(&Status::cancelled(
            "deadline reached on the server"
        )));
        assert!(!is_transient(&Status::invalid_argument("bad")));
        assert!(!is_transient(&Status::failed_precondition("reused")));
        assert!(!is_transient(&Status::internal("bug")));
        assert!(!is_transient(&Status::not_found("gone")));
        assert!(!is_transient(&Status::unauthenticated("no key")));
        assert!(!is_transient(&Status::permission_denied("wrong role")));
    }

    #[tokio::test]
    async fn refusals_of_the_api_key_are_returned_after_one_attempt() {
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            let mut attempts = 0;
            let result = with_retries(&RetryPolicy::default(), "GetTask", &(), |(), _| {
                attempts += 1;
                async move { Err::<Response<()>, _>(Status::new(code, "refused")) }
            })
            .await;
            assert!(
                matches!(&result, Err(ClientError::Rejected(status)) if status.code() == code),
                "{result:?}"
            );
            assert_eq!(attempts, 1);
        }
    }

    #[test]
    fn backoff_is_bounded_and_honours_retry_info() {
        let policy = RetryPolicy::default();
        for attempts in 1..20 {
            assert!(backoff(&policy, attempts, &Status::unavailable("x")) <= policy.max_backoff);
        }
        let mut details = ErrorDetails::new();
        details.set_retry_info(Some(Duration::from_secs(2)));
        let status = Status::with_error_details(Code::Aborted, "wait", details);
        assert!(backoff(&policy, 1, &status) >= Duration::from_secs(2));
    }

    #[test]
    fn backoff_ceiling_doubles_from_the_initial_one() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
        let status = Status::unavailable("x");
        for _ in 0..200 {
            assert!(backoff(&policy, 1, &status) <= Duration::from_millis(100));
            assert!(backoff(&policy, 3, &status) <= Duration::from_millis(400));
        }
    }

    #[test]
    fn durations_convert_exactly() {
        let d = proto_duration(Duration::from_millis(1500));
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
        assert_eq!(proto_duration(Duration::MAX).seconds, i64::MAX);
    }
}

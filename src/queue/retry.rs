//! What a failed attempt does to its task: the one place the retry policy
//! is decided (the permanent-failure rule, the attempt limit, the backoff
//! and its jitter). The stores are handed the decision, a
//! [`FailureOutcome`], and only write it, fenced by the lease.

use std::time::Duration;

use super::QueuePolicy;
use crate::{
    domain::{Failure, lease::is_last_attempt},
    storage::FailureOutcome,
};

/// The largest power of two the backoff ceiling is doubled to (after
/// attempt 31 it doubles no more; `backoff_max` caps it long before).
const MAX_DOUBLINGS: i32 = 30;

/// What failing `attempt` (the lease's attempt number) comes to: the task
/// ends FAILED when the failure is permanent or the attempt was the last
/// allowed one; otherwise it is queued again after the worker's
/// `retry_after`, or after a random delay up to the attempt's backoff
/// ceiling (full jitter). `fraction` is the jitter's random draw, in
/// `[0, 1)` (see [`random_fraction`]).
pub fn after_failure(
    policy: &QueuePolicy,
    attempt: i32,
    failure: &Failure,
    fraction: f64,
) -> FailureOutcome {
    let retry_in = if failure.permanent || is_last_attempt(attempt, policy.max_attempts) {
        None
    } else {
        Some(failure.retry_after.unwrap_or_else(|| {
            full_jitter(
                backoff_ceiling(policy.backoff_base, policy.backoff_max, attempt),
                fraction,
            )
        }))
    };
    FailureOutcome { attempt, retry_in }
}

/// The backoff ceiling after failing `attempt`: `base` doubled for each
/// attempt after the first, at most `max`.
pub fn backoff_ceiling(base: Duration, max: Duration, attempt: i32) -> Duration {
    let doublings = (attempt - 1).clamp(0, MAX_DOUBLINGS).unsigned_abs();
    base.saturating_mul(1 << doublings).min(max)
}

/// A delay drawn uniformly below `ceiling` (`fraction` of it, clamped to
/// `[0, 1)`), in whole microseconds, the stores' unit.
pub fn full_jitter(ceiling: Duration, fraction: f64) -> Duration {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let micros = (ceiling.as_micros() as f64 * fraction) as u64;
    // A fraction that rounds up to 1.0 still stays below the ceiling.
    let below = u64::try_from(ceiling.as_micros())
        .unwrap_or(u64::MAX)
        .saturating_sub(1);
    Duration::from_micros(micros.min(below))
}

/// A uniform random number in `[0, 1)`: 53 random bits, as many as an
/// `f64` holds. Without randomness (never on a supported system) it is 0,
/// a retry at once, which is what `retry_after` = 0 asks for anyway.
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.0;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{LeaseRef, TaskId};

    fn policy(max_attempts: i32, base: u64, max: u64) -> QueuePolicy {
        QueuePolicy {
            max_attempts,
            backoff_base: Duration::from_secs(base),
            backoff_max: Duration::from_secs(max),
            ..QueuePolicy::default()
        }
    }

    fn failure(permanent: bool, retry_after: Option<Duration>) -> Failure {
        Failure {
            lease: LeaseRef {
                task_id: TaskId(uuid::Uuid::nil()),
                token: uuid::Uuid::nil(),
            },
            message: "boom".into(),
            permanent,
            retry_after,
        }
    }

    #[test]
    fn a_permanent_failure_or_the_last_attempt_ends_the_task() {
        let policy = policy(3, 1, 60);

        assert_eq!(
            after_failure(&policy, 1, &failure(true, None), 0.5).retry_in,
            None
        );
        assert_eq!(
            after_failure(&policy, 3, &failure(false, None), 0.5).retry_in,
            None
        );
        assert_eq!(
            after_failure(&policy, 4, &failure(false, None), 0.5).retry_in,
            None
        );
        assert!(
            after_failure(&policy, 2, &failure(false, None), 0.5)
                .retry_in
                .is_some()
        );
    }

    #[test]
    fn the_decision_is_for_the_attempt_it_was_made_for() {
        let outcome = after_failure(&policy(5, 1, 60), 2, &failure(false, None), 0.0);

        assert_eq!(outcome.attempt, 2);
    }

    #[test]
    fn a_workers_retry_after_is_kept_as_asked_even_past_the_ceiling() {
        let asked = Duration::from_secs(3600);

        let outcome = after_failure(&policy(5, 1, 60), 1, &failure(false, Some(asked)), 0.9);

        assert_eq!(outcome.retry_in, Some(asked));
    }

    #[test]
    fn the_ceiling_doubles_from_the_base_up_to_the_max() {
        let (base, max) = (Duration::from_secs(100), Duration::from_secs(150));

        assert_eq!(backoff_ceiling(base, max, 1), base);
        assert_eq!(backoff_ceiling(base, max, 2), max);
        assert_eq!(
            backoff_ceiling(Duration::from_secs(1), Duration::from_secs(600), 4),
            Duration::from_secs(8)
        );
        // Far past the doublings, and at attempt 0, it stays in bounds.
        assert_eq!(backoff_ceiling(base, max, i32::MAX), max);
        assert_eq!(backoff_ceiling(base, max, 0), base);
        assert_eq!(
            backoff_ceiling(Duration::MAX, Duration::MAX, 40),
            Duration::MAX
        );
    }

    #[test]
    fn the_jitter_stays_below_the_ceiling_and_spans_it() {
        let ceiling = Duration::from_secs(100);

        assert_eq!(full_jitter(ceiling, 0.0), Duration::ZERO);
        assert_eq!(full_jitter(ceiling, 0.5), Duration::from_secs(50));
        assert!(full_jitter(ceiling, 1.0) < ceiling);
        assert!(full_jitter(ceiling, 0.999_999_999_999) < ceiling);
        assert_eq!(full_jitter(ceiling, -1.0), Duration::ZERO);
        assert_eq!(full_jitter(ceiling, f64::NAN), Duration::ZERO);
        assert_eq!(full_jitter(Duration::ZERO, 0.7), Duration::ZERO);
    }

    #[test]
    fn random_draws_are_in_the_unit_interval_and_vary() {
        let draws: Vec<f64> = (0..1000).map(|_| random_fraction()).collect();

        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(draws.iter().any(|f| *f < 0.25) && draws.iter().any(|f| *f > 0.75));
    }

    #[test]
    fn retry_delays_drawn_for_an_attempt_lie_within_its_ceiling() {
        let policy = policy(10, 1, 600);
        for attempt in 1..10 {
            let ceiling = backoff_ceiling(policy.backoff_base, policy.backoff_max, attempt);
            for _ in 0..100 {
                let outcome =
                    after_failure(&policy, attempt, &failure(false, None), random_fraction());
                let delay = outcome.retry_in.expect("queued again");
                assert!(delay < ceiling, "attempt {attempt}: {delay:?}");
            }
        }
    }
}

//! How a worker works: [`WorkerOptions`] and the heartbeat it implies.

use std::{fmt, time::Duration};

use crate::RetryPolicy;

/// The shortest heartbeat, whatever the options say.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// How a [`Worker`](super::Worker) works. Start from
/// [`WorkerOptions::new`] and change what you need:
///
/// ```
/// use oncely_client::WorkerOptions;
///
/// let options = WorkerOptions {
///     actions: vec!["send_email".into()],
///     concurrency: 8,
///     ..WorkerOptions::new("mailer-1")
/// };
/// assert_eq!(options.heartbeats_per_lease, 3);
/// ```
///
/// Its `Debug` shows `api_key: Some("***")`, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Who is asking, shown in the server's logs: 1 to 255 bytes.
    pub worker_id: String,
    /// The actions this worker performs; empty means any action.
    pub actions: Vec<String>,
    /// The most tasks whose handlers run at once (default 4; 0 means 1).
    pub concurrency: usize,
    /// How long each lease lasts unless renewed (default 30 s; the server
    /// accepts 1 s to 1 h). A crashed worker's tasks come back after it.
    pub lease_duration: Duration,
    /// How long one LeaseTasks call waits for a task when none is available
    /// (default 20 s, at most 60 s; zero polls without waiting).
    pub poll_wait: Duration,
    /// Renewals per lease duration (default 3: every 10 s for a 30 s
    /// lease; at least 2), so one lost renewal does not lose the lease.
    pub heartbeats_per_lease: u32,
    /// After shutdown, how long running handlers may take to finish before
    /// they are aborted and their tasks released (default 25 s, under the
    /// 30 s most process managers wait before SIGKILL). Also how long a
    /// handler may take to stop after its task was cancelled.
    pub shutdown_grace: Duration,
    /// How the worker retries its calls about a lease (RenewLease,
    /// CompleteTask, FailTask); its backoff also paces LeaseTasks failures.
    pub retry: RetryPolicy,
    /// The API key (a token from `oncely keys create --role worker`, the
    /// token alone without `Bearer `) sent as `authorization: Bearer
    /// <token>` on every call: LeaseTasks, RenewLease, CompleteTask and
    /// FailTask. Default `None`, and nothing reads the environment by
    /// itself: pass [`api_key_from_env`](crate::api_key_from_env) for
    /// `ONCELY_API_KEY`. A token that is not visible ASCII makes
    /// [`Worker::connect`](super::Worker::connect) and
    /// [`Worker::run`](super::Worker::run) fail with
    /// [`ClientError::InvalidApiKey`](crate::ClientError::InvalidApiKey).
    pub api_key: Option<String>,
}

impl fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so a new field cannot be left out unnoticed.
        let Self {
            worker_id,
            actions,
            concurrency,
            lease_duration,
            poll_wait,
            heartbeats_per_lease,
            shutdown_grace,
            retry,
            api_key,
        } = self;
        f.debug_struct("WorkerOptions")
            .field("worker_id", worker_id)
            .field("actions", actions)
            .field("concurrency", concurrency)
            .field("lease_duration", lease_duration)
            .field("poll_wait", poll_wait)
            .field("heartbeats_per_lease", heartbeats_per_lease)
            .field("shutdown_grace", shutdown_grace)
            .field("retry", retry)
            .field("api_key", &api_key.as_ref().map(|_| "***"))
            .finish()
    }
}

impl WorkerOptions {
    /// The defaults, under `worker_id`.
    pub fn new(worker_id: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            actions: Vec::new(),
            concurrency: 4,
            lease_duration: Duration::from_secs(30),
            poll_wait: Duration::from_secs(20),
            heartbeats_per_lease: 3,
            shutdown_grace: Duration::from_secs(25),
            retry: RetryPolicy::default(),
            api_key: None,
        }
    }
}

impl Default for WorkerOptions {
    /// The defaults, under a worker id made of `$HOSTNAME` (or `worker`),
    /// the process id and a random suffix.
    fn default() -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
        let id = format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..));
        Self::new(id)
    }
}

/// How often to renew a lease of `lease`: `heartbeats_per_lease` times per
/// lease, at least twice, and never more often than every 100 ms.
pub(super) fn heartbeat_interval(lease: Duration, heartbeats_per_lease: u32) -> Duration {
    (lease / heartbeats_per_lease.max(2)).max(MIN_HEARTBEAT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_renewed_three_times_per_duration_by_default() {
        let options = WorkerOptions::new("w");
        assert_eq!(
            heartbeat_interval(options.lease_duration, options.heartbeats_per_lease),
            Duration::from_secs(10)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(1), 4),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn the_heartbeat_is_at_least_twice_per_lease_and_never_zero() {
        assert_eq!(
            heartbeat_interval(Duration::from_secs(30), 0),
            Duration::from_secs(15)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(30), 1),
            Duration::from_secs(15)
        );
        assert_eq!(heartbeat_interval(Duration::ZERO, 3), MIN_HEARTBEAT);
    }

    #[test]
    fn default_options_match_the_documentation() {
        let options = WorkerOptions::default();
        assert!(!options.worker_id.is_empty() && options.worker_id.len() <= 255);
        assert_eq!(options.concurrency, 4);
        assert_eq!(options.lease_duration, Duration::from_secs(30));
        assert_eq!(options.poll_wait, Duration::from_secs(20));
        assert_eq!(options.shutdown_grace, Duration::from_secs(25));
        assert!(options.actions.is_empty());
        assert_eq!(options.api_key, None);
        assert_ne!(WorkerOptions::default().worker_id, options.worker_id);
    }

    #[test]
    fn debug_shows_that_there_is_a_key_but_not_the_key() {
        let token = "oncely_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let options = WorkerOptions {
            api_key: Some(token.into()),
            ..WorkerOptions::new("mailer-1")
        };
        for shown in [format!("{options:?}"), format!("{options:#?}")] {
            assert!(
                !shown.contains(token) && !shown.contains("oncely_"),
                "{shown}"
            );
            assert!(shown.contains("mailer-1"), "{shown}");
        }
        assert!(format!("{options:?}").contains(r#"api_key: Some("***")"#));
        assert!(format!("{:?}", WorkerOptions::new("w")).contains("api_key: None"));
    }
}

//! The retrying client: one logical call, one key, safe retries.
//!
//! [`OncelyClient::create_task`] generates a UUID v4 key once and sends it on
//! every attempt, so however often the call is retried the server creates
//! one task. Transient failures are retried with exponential backoff and full
//! jitter: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `ABORTED` (waiting at least
//! the server's `RetryInfo`), `CANCELLED`, and connections that broke before
//! an answer arrived. Every other error is returned at once:
//! `INVALID_ARGUMENT` and `FAILED_PRECONDITION` in particular mean the
//! request must change, and a retry would fail the same way. Attempts and
//! total time are bounded by the [`RetryPolicy`]. Reads (`get_task`,
//! `list_tasks`) are retried by the same rules, since repeating them is
//! always safe.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tonic::{
    Code, Request, Response, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::Channel,
};
use tonic_types::StatusExt;

use crate::{
    metadata::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    proto::tasks_v1::{
        CreateTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse, Task,
        task_service_client::TaskServiceClient,
    },
};

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

/// A task the server created, or had created for this key before.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The task.
    pub task: Task,
    /// True when this answer is the replay of an earlier attempt's (or an
    /// earlier call's) response.
    pub replayed: bool,
    /// The idempotency key that was sent; reuse it to ask again.
    pub key: String,
    /// How many attempts it took.
    pub attempts: u32,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not a valid URI.
    #[error("invalid server address {0:?}")]
    Address(String),
    /// The idempotency key cannot be sent as metadata.
    #[error("the idempotency key must be 1 to 255 visible ASCII characters (0x21 to 0x7E)")]
    InvalidKey,
    /// The server refused the request; retrying it unchanged cannot help.
    #[error("the server refused the request: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Rejected(Status),
    /// Every attempt failed transiently, or time ran out.
    #[error("gave up after {attempts} attempts: {code:?}: {message}", code = .last.code(), message = .last.message())]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Status,
    },
}

/// A TaskService client that retries safely.
#[derive(Debug, Clone)]
pub struct OncelyClient {
    tasks: TaskServiceClient<Channel>,
    policy: RetryPolicy,
}

impl OncelyClient {
    /// A client for the server at `address`, such as
    /// `http://127.0.0.1:50051`. It connects on first use and reconnects by
    /// itself, so a server that is briefly down is just a retry.
    pub fn connect(address: impl Into<String>) -> Result<Self, ClientError> {
        let address = address.into();
        let channel = Channel::from_shared(address.clone())
            .map_err(|_| ClientError::Address(address))?
            .connect_timeout(Duration::from_secs(5))
            // Notice a connection that went silent, rather than wait on it.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self::new(channel))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            tasks: TaskServiceClient::new(channel),
            policy: RetryPolicy::default(),
        }
    }

    /// The same client with another retry policy.
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The generated client, for calls this type does not wrap.
    pub fn tasks(&self) -> TaskServiceClient<Channel> {
        self.tasks.clone()
    }

    /// Creates a task under a new UUID v4 key.
    pub async fn create_task(&self, request: CreateTaskRequest) -> Result<Created, ClientError> {
        let key = uuid::Uuid::new_v4().to_string();
        self.create_task_with_key(&key, request).await
    }

    /// Creates a task under `key`: the caller's key for this logical call,
    /// for instance one stored before a crash of the agent itself.
    pub async fn create_task_with_key(
        &self,
        key: &str,
        request: CreateTaskRequest,
    ) -> Result<Created, ClientError> {
        let key_value = key_metadata(key)?;
        let (response, attempts) = self
            .with_retries("CreateTask", |mut tasks, timeout| {
                let mut call = Request::new(request.clone());
                call.metadata_mut()
                    .insert(IDEMPOTENCY_KEY, key_value.clone());
                call.set_timeout(timeout);
                async move { tasks.create_task(call).await }
            })
            .await?;
        let replayed = response
            .metadata()
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes() == b"true");
        Ok(Created {
            task: response.into_inner(),
            replayed,
            key: key.to_owned(),
            attempts,
        })
    }

    /// Reads one task by its id.
    pub async fn get_task(&self, task_id: &str) -> Result<Task, ClientError> {
        let request = GetTaskRequest {
            task_id: task_id.to_owned(),
        };
        let (response, _) = self
            .with_retries("GetTask", |mut tasks, timeout| {
                let mut call = Request::new(request.clone());
                call.set_timeout(timeout);
                async move { tasks.get_task(call).await }
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Reads one page of an agent's tasks, oldest first. A `page_size` of 0
    /// means the server's default; pass the previous page's
    /// `next_page_token` to continue, which is empty on the last page.
    pub async fn list_tasks(
        &self,
        agent_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<ListTasksResponse, ClientError> {
        let request = ListTasksRequest {
            agent_id: agent_id.to_owned(),
            page_size,
            page_token: page_token.to_owned(),
        };
        let (response, _) = self
            .with_retries("ListTasks", |mut tasks, timeout| {
                let mut call = Request::new(request.clone());
                call.set_timeout(timeout);
                async move { tasks.list_tasks(call).await }
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Runs `attempt` until it succeeds, fails for good, or the policy's
    /// attempts or time run out. Returns the response and the attempts made.
    async fn with_retries<T, F, Fut>(
        &self,
        method: &'static str,
        mut attempt: F,
    ) -> Result<(Response<T>, u32), ClientError>
    where
        F: FnMut(TaskServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let policy = self.policy;
        let deadline = Instant::now() + policy.total_timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let limit = policy.attempt_timeout.min(remaining);
            // The gRPC deadline covers the wait for the response headers;
            // this bounds the whole attempt, body and trailers included.
            let status = match tokio::time::timeout(limit, attempt(self.tasks.clone(), limit)).await
            {
                Ok(Ok(response)) => return Ok((response, attempts)),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("the attempt timed out"),
            };
            if !is_transient(&status) {
                return Err(ClientError::Rejected(status));
            }
            let wait = backoff(&policy, attempts, &status);
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
}

/// The key as metadata, if it follows the server's rules for keys.
fn key_metadata(key: &str) -> Result<AsciiMetadataValue, ClientError> {
    let valid = (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !valid {
        return Err(ClientError::InvalidKey);
    }
    MetadataValue::try_from(key).map_err(|_| ClientError::InvalidKey)
}

/// Whether a failed attempt may succeed if repeated with the same key.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        // CANCELLED: the server gave up on the deadline, or the call was cut;
        // repeating it with the same key is always safe.
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => true,
        // A status with a source was made on this side from a transport
        // error (a connection that broke before the answer arrived), not
        // sent by the server.
        Code::Unknown | Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// Full jitter: a random wait up to the exponential ceiling, but never less
/// than the server's `RetryInfo` delay.
fn backoff(policy: &RetryPolicy, attempts: u32, status: &Status) -> Duration {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

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
    fn keys_the_server_would_refuse_are_refused_before_sending() {
        assert!(key_metadata("0b6c3f4e-8a3e-4d2b-9a51-6f0c2a7d9e11").is_ok());
        assert!(matches!(key_metadata(""), Err(ClientError::InvalidKey)));
        assert!(matches!(key_metadata("a b"), Err(ClientError::InvalidKey)));
        assert!(matches!(
            key_metadata(&"k".repeat(256)),
            Err(ClientError::InvalidKey)
        ));
    }
}

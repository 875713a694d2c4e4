//! The retrying client: one logical call, one key, safe retries.
//!
//! [`OncelyClient::create_task`] generates a UUID v4 key once and sends it on
//! every attempt, so however often the call is retried the server creates
//! one task. Transient failures are retried by the rules of
//! [`retry`](crate::RetryPolicy): exponential backoff with full jitter,
//! never sooner than the server's `RetryInfo`, and never on
//! `INVALID_ARGUMENT` or `FAILED_PRECONDITION`, which mean the request must
//! change. Reads (`get_task`, `list_tasks`, `wait_task`) and `cancel_task`
//! are retried by the same rules, since repeating them is always safe.
//!
//! With [`OncelyClient::with_api_key`] every call sends
//! `authorization: Bearer <token>`; `UNAUTHENTICATED` and
//! `PERMISSION_DENIED` are never retried.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tonic::{
    Request, Response, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::{
    ClientError, RetryPolicy,
    auth::{ApiKey, authorize},
    metadata::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    proto::tasks_v1::{
        CancelTaskRequest, CreateTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse,
        Task, TaskStatus, WaitTaskRequest, task_service_client::TaskServiceClient,
    },
    retry::{attempt_once, backoff, is_transient, proto_duration, with_retries},
};

/// The longest wait one WaitTask call may ask the server for.
pub(crate) const MAX_WAIT_PER_CALL: Duration = Duration::from_secs(60);

/// The shortest time between two WaitTask calls, should a server answer
/// before the wait it was asked for ran out: a pause, not a spin.
const MIN_WAIT_PERIOD: Duration = Duration::from_secs(1);

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

/// A TaskService client that retries safely. Its `Debug` shows whether it
/// has an API key (`api_key: Some("***")`), never the key.
#[derive(Debug, Clone)]
pub struct OncelyClient {
    tasks: TaskServiceClient<Channel>,
    policy: RetryPolicy,
    api_key: Option<ApiKey>,
}

/// How to reach a server over TLS (an `https://` address). By default the
/// operating system's roots are trusted; add a CA for a private one, and an
/// identity when the server asks clients for certificates (mTLS).
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// A PEM CA certificate to trust besides the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A PEM client certificate and its PEM private key.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "…"))
            .field("identity_pem", &self.identity_pem.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A channel to `address` that connects on first use and reconnects by
/// itself, so a server that is briefly down is just a retry. An `https://`
/// address is secured with TLS as `tls` says; it never falls back to
/// plaintext.
pub fn channel(address: impl Into<String>, tls: &TlsOptions) -> Result<Channel, ClientError> {
    let address = address.into();
    let secure = address
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("https://");
    let mut endpoint = Channel::from_shared(address.clone())
        .map_err(|_| ClientError::Address(address.clone()))?
        .connect_timeout(Duration::from_secs(5))
        // Notice a connection that went silent, rather than wait on it.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if secure {
        let mut config = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &tls.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &tls.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    } else if tls.ca_pem.is_some() || tls.identity_pem.is_some() {
        return Err(ClientError::Tls(format!(
            "TLS options were given for {address:?}, which is not an https:// address"
        )));
    }
    Ok(endpoint.connect_lazy())
}

/// A channel as [`channel`] makes it, with the default TLS options.
pub(crate) fn lazy_channel(address: impl Into<String>) -> Result<Channel, ClientError> {
    channel(address, &TlsOptions::default())
}

impl OncelyClient {
    /// A client for the server at `address`, such as
    /// `http://127.0.0.1:50051`. It connects on first use and reconnects by
    /// itself, so a server that is briefly down is just a retry. It sends
    /// no API key (and reads none from the environment) until
    /// [`with_api_key`](Self::with_api_key).
    pub fn connect(address: impl Into<String>) -> Result<Self, ClientError> {
        Ok(Self::new(lazy_channel(address)?))
    }

    /// Like [`connect`](Self::connect), with TLS options for an `https://`
    /// address: a private CA, a client certificate.
    pub fn connect_with_tls(
        address: impl Into<String>,
        tls: &TlsOptions,
    ) -> Result<Self, ClientError> {
        Ok(Self::new(channel(address, tls)?))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            tasks: TaskServiceClient::new(channel),
            policy: RetryPolicy::default(),
            api_key: None,
        }
    }

    /// The same client, sending `authorization: Bearer <token>` on every
    /// call: a key made with `oncely keys create` (the token alone, without
    /// `Bearer `; surrounding whitespace is removed). A server with keys
    /// answers calls without one `UNAUTHENTICATED`, and calls the key's
    /// role or scope does not allow `PERMISSION_DENIED`; neither is
    /// retried. To use `ONCELY_API_KEY`, pass
    /// [`api_key_from_env`](crate::api_key_from_env)'s answer.
    ///
    /// Fails with [`ClientError::InvalidApiKey`] (which never shows the
    /// token) unless the token is one or more visible ASCII characters.
    pub fn with_api_key(mut self, token: impl Into<String>) -> Result<Self, ClientError> {
        self.api_key = Some(ApiKey::new(&token.into())?);
        Ok(self)
    }

    /// The same client with the API key of `ONCELY_API_KEY` when it is set
    /// and not empty ([`api_key_from_env`](crate::api_key_from_env)), and
    /// unchanged otherwise: what an agent that may run with or without
    /// keys wants.
    pub fn with_api_key_from_env(self) -> Result<Self, ClientError> {
        match crate::api_key_from_env() {
            Some(token) => self.with_api_key(token),
            None => Ok(self),
        }
    }

    /// Whether calls send an API key.
    pub fn has_api_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// The same client with another retry policy.
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The generated client, for calls this type does not wrap. It adds
    /// no API key by itself: build its requests with
    /// [`request`](Self::request).
    pub fn tasks(&self) -> TaskServiceClient<Channel> {
        self.tasks.clone()
    }

    /// A request for `message` carrying this client's API key, if it has
    /// one: what every call of this client sends.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        authorize(&mut request, self.api_key.as_ref());
        crate::trace::propagate(&mut request);
        request
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
                let mut call = self.request(request.clone());
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
                let mut call = self.request(request.clone());
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
                let mut call = self.request(request.clone());
                call.set_timeout(timeout);
                async move { tasks.list_tasks(call).await }
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Cancels a queued or running task and returns it; a running task's
    /// worker learns it at its next heartbeat. A finished task is returned
    /// unchanged, so calling this again is harmless.
    pub async fn cancel_task(&self, task_id: &str) -> Result<Task, ClientError> {
        let request = CancelTaskRequest {
            task_id: task_id.to_owned(),
        };
        let (response, _) = self
            .with_retries("CancelTask", |mut tasks, timeout| {
                let mut call = self.request(request.clone());
                call.set_timeout(timeout);
                async move { tasks.cancel_task(call).await }
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Waits until the task is finished (see [`is_finished`]) or `timeout`
    /// runs out, and returns it as it is then: check its `status`.
    ///
    /// Each WaitTask call waits at most 60 s on the server, with a deadline
    /// the policy's `attempt_timeout` past that; this keeps calling until
    /// the task is finished or `timeout` has passed, so any `timeout` works.
    /// A zero `timeout` reads the task without waiting. Transient failures
    /// are retried within the policy's attempts and total time, counted
    /// from the first failure in a row.
    pub async fn wait_task(&self, task_id: &str, timeout: Duration) -> Result<Task, ClientError> {
        let policy = self.policy;
        let deadline = Instant::now() + timeout;
        // Transient failures in a row, and when the first of them ended.
        let mut failures: Option<(u32, Instant)> = None;
        loop {
            let started = Instant::now();
            let wait = deadline
                .saturating_duration_since(started)
                .min(MAX_WAIT_PER_CALL);
            let status = match self.wait_once(task_id, wait).await {
                Ok(task) if is_finished(&task) || Instant::now() >= deadline => return Ok(task),
                Ok(_) => {
                    failures = None;
                    let pause = wait.min(MIN_WAIT_PERIOD).saturating_sub(started.elapsed());
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(status) => status,
            };
            if !is_transient(&status) {
                return Err(ClientError::Rejected(status));
            }
            let (attempts, since) = failures.get_or_insert((0, Instant::now()));
            *attempts += 1;
            let pause = backoff(&policy, *attempts, &status);
            if *attempts >= policy.max_attempts.max(1)
                || Instant::now() + pause >= *since + policy.total_timeout
            {
                return Err(ClientError::GaveUp {
                    attempts: *attempts,
                    last: status,
                });
            }
            tracing::debug!(method = "WaitTask", attempts, ?pause, code = ?status.code(), "retrying");
            tokio::time::sleep(pause).await;
        }
    }

    /// One WaitTask call for `wait`, or one GetTask when `wait` is zero.
    async fn wait_once(&self, task_id: &str, wait: Duration) -> Result<Task, Status> {
        let mut tasks = self.tasks.clone();
        let task_id = task_id.to_owned();
        let limit = wait + self.policy.attempt_timeout;
        if wait.is_zero() {
            let mut call = self.request(GetTaskRequest { task_id });
            call.set_timeout(limit);
            return attempt_once(limit, tasks.get_task(call)).await;
        }
        let mut call = self.request(WaitTaskRequest {
            task_id,
            timeout: Some(proto_duration(wait)),
        });
        call.set_timeout(limit);
        attempt_once(limit, tasks.wait_task(call)).await
    }

    async fn with_retries<T, F, Fut>(
        &self,
        method: &'static str,
        attempt: F,
    ) -> Result<(Response<T>, u32), ClientError>
    where
        F: FnMut(TaskServiceClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        with_retries(&self.policy, method, &self.tasks, attempt).await
    }
}

/// Whether a task is finished: SUCCEEDED, FAILED or CANCELLED. A finished
/// task never changes again.
pub fn is_finished(task: &Task) -> bool {
    matches!(
        task.status(),
        TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
    )
}

/// The key as metadata, if it follows the server's rules for keys.
fn key_metadata(key: &str) -> Result<AsciiMetadataValue, ClientError> {
    let valid = (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if !valid {
        return Err(ClientError::InvalidKey);
    }
    MetadataValue::try_from(key).map_err(|_| ClientError::InvalidKey)
}

#[cfg(test)]
mod tests;

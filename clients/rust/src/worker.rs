//! The worker: leases tasks, runs your handler on each, renews each lease
//! while the handler works, and tells the server how each attempt went.
//!
//! The loop is the one of River, Oban or Sidekiq, over oncely's
//! `WorkerService`:
//!
//! - **lease** with a long poll, at most [`WorkerOptions::concurrency`]
//!   tasks in flight; a failing LeaseTasks backs off (full jitter) rather
//!   than spinning, and is retried for as long as the worker runs;
//! - **heartbeat**: every `lease_duration / heartbeats_per_lease` the lease
//!   is renewed; if the server answers that the task was cancelled or the
//!   lease was lost, the handler is told through
//!   [`TaskContext::cancelled`] and the worker stops working on the task:
//!   whatever the handler returns then is not reported;
//! - **report**: `Ok(result)` completes the task (retried with the same
//!   token; completion is idempotent on the server), `Err(TaskError)` fails
//!   the attempt, and a panic is a retryable failure with its message;
//! - **graceful stop**: when the `shutdown` future completes, leasing
//!   stops, and running handlers get [`WorkerOptions::shutdown_grace`] to
//!   finish; the ones still running then are aborted and their tasks
//!   released at once (a retryable failure with no delay, which counts as
//!   an attempt), so another worker takes them without waiting for the
//!   lease to run out.
//!
//! Delivery is at least once: key the side effect by
//! [`TaskContext::idempotency_key`] (the task id).
//!
//! With [`WorkerOptions::api_key`] every call sends
//! `authorization: Bearer <token>`; a LeaseTasks refused `UNAUTHENTICATED`
//! or `PERMISSION_DENIED` ends [`Worker::run`] with an error.

mod calls;
mod context;
mod lease;
mod options;
mod task_error;

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use serde_json::Value;
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tonic::{Request, Status, transport::Channel};
use tracing::Instrument;

pub use context::{CancelHandle, CancelReason, TaskContext};
pub use options::WorkerOptions;
pub use task_error::TaskError;

use crate::{
    ClientError,
    auth::{ApiKey, authorize},
    client::{MAX_WAIT_PER_CALL, lazy_channel},
    proto::tasks_v1::{Lease, LeaseTasksRequest, Task, worker_service_client::WorkerServiceClient},
    retry::{attempt_once, backoff, is_transient, proto_duration},
};
use calls::Calls;
use lease::{RELEASE_TIMEOUT, Timing};
use options::heartbeat_interval;

/// The most tasks one LeaseTasks call may ask for.
const MAX_TASKS_PER_LEASE: usize = 100;

/// The shortest time between two polls that found nothing, should the
/// server answer before `poll_wait` ran out.
const MIN_EMPTY_POLL_PERIOD: Duration = Duration::from_secs(1);

/// Leases tasks and runs a handler on each; see the [module](self) docs.
/// Its `Debug` shows whether it has an API key, never the key.
///
/// ```no_run
/// use oncely_client::{TaskContext, TaskError, Worker, WorkerOptions, proto::tasks_v1::Task};
/// use serde_json::{Value, json};
///
/// async fn send_email(task: Task, ctx: TaskContext) -> Result<Value, TaskError> {
///     // Call the mail API with ctx.idempotency_key() as its idempotency key.
///     Ok(json!({"message_id": ctx.idempotency_key()}))
/// }
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let options = WorkerOptions {
///     actions: vec!["send_email".into()],
///     ..WorkerOptions::new("mailer-1")
/// };
/// let worker = Worker::connect("http://127.0.0.1:50051", options)?;
/// worker.run(send_email, tokio::signal::ctrl_c()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Worker {
    client: WorkerServiceClient<Channel>,
    options: WorkerOptions,
    /// The options' API key as metadata; `Err` when it cannot be sent.
    api_key: Result<Option<ApiKey>, InvalidApiKey>,
}

/// The options hold an API key that cannot be sent as metadata.
#[derive(Debug, Clone, Copy)]
struct InvalidApiKey;

/// The API key of `options` as metadata.
fn api_key_of(options: &WorkerOptions) -> Result<Option<ApiKey>, InvalidApiKey> {
    options
        .api_key
        .as_deref()
        .map(ApiKey::new)
        .transpose()
        .map_err(|_| InvalidApiKey)
}

impl Worker {
    /// A worker for the server at `address`, such as
    /// `http://127.0.0.1:50051`; it connects on first use and reconnects by
    /// itself. Fails with [`ClientError::InvalidApiKey`] if the options'
    /// API key cannot be sent.
    pub fn connect(
        address: impl Into<String>,
        options: WorkerOptions,
    ) -> Result<Self, ClientError> {
        let worker = Self::new(lazy_channel(address)?, options);
        worker.api_key()?;
        Ok(worker)
    }

    /// A worker over an existing channel. An API key in the options that
    /// cannot be sent makes [`run`](Self::run) fail at once.
    pub fn new(channel: Channel, options: WorkerOptions) -> Self {
        let api_key = api_key_of(&options);
        Self {
            client: WorkerServiceClient::new(channel),
            options,
            api_key,
        }
    }

    fn api_key(&self) -> Result<Option<ApiKey>, ClientError> {
        self.api_key
            .clone()
            .map_err(|InvalidApiKey| ClientError::InvalidApiKey)
    }

    /// The options it runs with.
    pub fn options(&self) -> &WorkerOptions {
        &self.options
    }

    /// The generated client, for a loop of your own. It adds no API key by
    /// itself: build its requests with [`request`](Self::request).
    pub fn client(&self) -> WorkerServiceClient<Channel> {
        self.client.clone()
    }

    /// A request for `message` carrying the options' API key, if they have
    /// one (and it can be sent): what every call of the worker sends.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        authorize(
            &mut request,
            self.api_key.as_ref().ok().and_then(Option::as_ref),
        );
        crate::trace::propagate(&mut request);
        request
    }

    /// Works until `shutdown` completes (with any output: pass
    /// `tokio::signal::ctrl_c()` as it is, or a `oneshot::Receiver` in a
    /// test), then stops gracefully (see the [module](self) docs) and
    /// returns `Ok(())` once no handler runs.
    ///
    /// `handler` runs once per lease, in its own tokio task, with the task
    /// (RUNNING, its `attempt` counted from 1) and its [`TaskContext`]. It
    /// returns the task's result, which must be a JSON object (any other
    /// value, `null` included, fails the task permanently, since a retry
    /// would return the same), or a [`TaskError`]. Share state with it
    /// through an `Arc` the closure owns.
    ///
    /// Returns an error only when the server refuses LeaseTasks in a way no
    /// retry can help (an invalid `worker_id` or `lease_duration`, a server
    /// without `WorkerService`, `UNAUTHENTICATED` for a missing, unknown or
    /// revoked API key, `PERMISSION_DENIED` for a key whose role may not
    /// lease); running handlers are then wound down as at shutdown. An API
    /// key that cannot be sent fails it at once with
    /// [`ClientError::InvalidApiKey`]. Transient failures are retried for as
    /// long as it runs.
    pub async fn run<H, Fut, S>(&self, handler: H, shutdown: S) -> Result<(), ClientError>
    where
        H: Fn(Task, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
        S: Future,
    {
        let options = &self.options;
        let concurrency = options.concurrency.max(1);
        let calls = Calls {
            client: self.client.clone(),
            policy: options.retry,
            lease_duration: options.lease_duration,
            api_key: self.api_key()?,
        };
        let timing = Timing {
            heartbeat: heartbeat_interval(options.lease_duration, options.heartbeats_per_lease),
            grace: options.shutdown_grace,
        };
        let handler = Arc::new(handler);
        let (stop, stopped) = watch::channel(false);
        let mut running = JoinSet::new();
        let mut shutdown = pin!(shutdown);
        // LeaseTasks failures in a row, for the backoff.
        let mut failures = 0;
        tracing::info!(worker_id = %options.worker_id, concurrency, "worker started");
        let ended = loop {
            while let Some(joined) = running.try_join_next() {
                note(joined);
            }
            let free = concurrency.saturating_sub(running.len());
            if free == 0 {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break Ok(()),
                    Some(joined) = running.join_next() => note(joined),
                }
                continue;
            }
            let started = Instant::now();
            // A lease answered together with the shutdown is still run; one
            // still being polled for is dropped (a task leased just then
            // comes back when its lease runs out).
            let polled = tokio::select! {
                biased;
                polled = self.lease(free) => polled,
                _ = &mut shutdown => break Ok(()),
            };
            let pause = match polled {
                Ok(leases) if leases.is_empty() => {
                    failures = 0;
                    MIN_EMPTY_POLL_PERIOD.saturating_sub(started.elapsed())
                }
                Ok(leases) => {
                    failures = 0;
                    for lease in leases {
                        let span = task_span(&lease);
                        let work = lease::work(
                            calls.clone(),
                            lease,
                            Arc::clone(&handler),
                            stopped.clone(),
                            timing,
                        );
                        running.spawn(work.instrument(span));
                    }
                    Duration::ZERO
                }
                Err(status) if is_transient(&status) => {
                    failures += 1;
                    let pause = backoff(&options.retry, failures, &status);
                    tracing::warn!(failures, ?pause, code = ?status.code(), message = status.message(), "leasing failed; backing off");
                    pause
                }
                Err(status) => {
                    tracing::error!(code = ?status.code(), message = status.message(), "the server refused LeaseTasks; stopping");
                    break Err(ClientError::Rejected(status));
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break Ok(()),
                    () = tokio::time::sleep(pause) => {}
                }
            }
        };
        tracing::info!(in_flight = running.len(), "worker stopping");
        drain(&mut running, &stop, options.shutdown_grace).await;
        tracing::info!("worker stopped");
        ended
    }

    /// One LeaseTasks call for up to `max_tasks`, long-polling `poll_wait`.
    async fn lease(&self, max_tasks: usize) -> Result<Vec<Lease>, Status> {
        let options = &self.options;
        let wait = options.poll_wait.min(MAX_WAIT_PER_CALL);
        let limit = wait + options.retry.attempt_timeout;
        let mut call = self.request(LeaseTasksRequest {
            worker_id: options.worker_id.clone(),
            actions: options.actions.clone(),
            max_tasks: i32::try_from(max_tasks.min(MAX_TASKS_PER_LEASE)).unwrap_or(1),
            lease_duration: Some(proto_duration(options.lease_duration)),
            wait: (!wait.is_zero()).then(|| proto_duration(wait)),
        });
        call.set_timeout(limit);
        let mut client = self.client.clone();
        let response = attempt_once(limit, client.lease_tasks(call)).await?;
        Ok(response.leases)
    }
}

/// The span every log line about one lease is in: ids and counts, never the
/// task's parameters.
fn task_span(lease: &Lease) -> tracing::Span {
    let task = lease.task.as_ref();
    tracing::info_span!(
        "task",
        task_id = task.map_or("", |t| t.task_id.as_str()),
        attempt = task.map_or(0, |t| t.attempt),
        action = task.map_or("", |t| t.action.as_str()),
    )
}

/// Waits for the running leases to end: for `grace`, then tells them to
/// abort their handlers and release their tasks, and aborts whatever is
/// still running a little after the release's own time limit.
async fn drain(running: &mut JoinSet<()>, stop: &watch::Sender<bool>, grace: Duration) {
    if tokio::time::timeout(grace, join_all(running)).await.is_ok() {
        return;
    }
    tracing::warn!(
        still_running = running.len(),
        "the shutdown grace ran out; aborting handlers and releasing their tasks"
    );
    stop.send_replace(true);
    let release_time = RELEASE_TIMEOUT + Duration::from_secs(1);
    if tokio::time::timeout(release_time, join_all(running))
        .await
        .is_err()
    {
        running.abort_all();
        join_all(running).await;
    }
}

async fn join_all(running: &mut JoinSet<()>) {
    while let Some(joined) = running.join_next().await {
        note(joined);
    }
}

/// Logs a lease's supervising task that did not end normally (a bug).
fn note(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "a lease's supervisor panicked");
    }
}

#[cfg(test)]
mod tests;

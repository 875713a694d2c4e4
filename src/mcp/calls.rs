//! The calls the tools make: the TaskService's RPCs, sent through the very
//! gates and services every other surface uses, either in this process
//! (the server's `/mcp`) or over gRPC to a running server (`oncely mcp`).

use std::{convert::Infallible, time::Duration};

use oncely_client::{
    is_transient,
    metadata::{AUTHORIZATION, IDEMPOTENCY_FALLBACK, IDEMPOTENCY_KEY},
};
use tonic::{
    Request, Response, Status,
    body::Body,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::Channel,
};
use tonic_types::StatusExt;
use tower::util::BoxCloneSyncService;

use crate::api::ConnectionInfo;
use crate::proto::tasks_v1::{
    CancelTaskRequest, CreateTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse,
    Task, WaitTaskRequest, task_service_client::TaskServiceClient,
};

/// A gRPC service to call: the server's own stack, or a channel.
type Grpc = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, TransportError>;

/// A call that failed before an answer came: the channel's error. (A
/// concrete type rather than a boxed error, which the generated client's
/// `Into<StdError>` bound cannot be proven for in a `Send` future.)
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct TransportError(#[from] tonic::transport::Error);

/// The TaskService, and how hard to try each call.
#[derive(Clone)]
pub struct Tasks {
    client: TaskServiceClient<Grpc>,
    /// The most attempts of a call that fails transiently.
    attempts: u32,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Who makes a call, and what its transport said.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The `authorization` to send: `Bearer <token>`.
    pub authorization: Option<AsciiMetadataValue>,
    /// The connection the call came on: its peer, for the gates that limit
    /// peers, and its calls, so the connection's limits count this one.
    pub connection: Option<ConnectionInfo>,
    /// The `Idempotency-Key` of the HTTP request that carried the call.
    pub transport_key: Option<String>,
}

/// The key a create is sent with.
#[derive(Debug, Clone, Copy)]
pub enum Keyed<'a> {
    /// This key.
    Key(&'a str),
    /// None: deduplicated by fingerprint.
    Fingerprint,
}

impl Tasks {
    /// The server's own services, behind its gates: calls are answered in
    /// this process, once each (a failure goes back to the model, which
    /// retries).
    pub fn in_process<S>(stack: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let service = tower::ServiceExt::map_err(stack, |never: Infallible| -> TransportError {
            match never {}
        });
        Self {
            client: TaskServiceClient::new(BoxCloneSyncService::new(service)),
            attempts: 1,
        }
    }

    /// A server over `channel`: a call that fails transiently (the
    /// connection, an unavailable store, a rate limit) is tried again, up to
    /// `attempts` times in all, with the same key.
    pub fn remote(channel: Channel, attempts: u32) -> Self {
        let service = tower::ServiceExt::map_err(channel, TransportError);
        Self {
            client: TaskServiceClient::new(BoxCloneSyncService::new(service)),
            attempts: attempts.max(1),
        }
    }

    /// CreateTask with `key`; the task, and whether it was replayed.
    pub async fn create(
        &self,
        caller: &Caller,
        key: Keyed<'_>,
        message: CreateTaskRequest,
    ) -> Result<(Task, bool), Status> {
        let mut metadata = MetadataMap::new();
        match key {
            Keyed::Key(key) => {
                let value = AsciiMetadataValue::try_from(key).map_err(|_| {
                    Status::invalid_argument(
                        "idempotency_key holds a character outside visible ASCII; send a UUID v4",
                    )
                })?;
                metadata.insert(IDEMPOTENCY_KEY, value);
            }
            Keyed::Fingerprint => {
                metadata.insert(
                    IDEMPOTENCY_FALLBACK,
                    AsciiMetadataValue::from_static("fingerprint"),
                );
            }
        }
        let response = self
            .call(caller, &metadata, message, None, |mut c, r| async move {
                c.create_task(r).await
            })
            .await?;
        let replayed = response
            .metadata()
            .get(oncely_client::metadata::IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v == "true");
        Ok((response.into_inner(), replayed))
    }

    /// GetTask.
    pub async fn get(&self, caller: &Caller, task_id: String) -> Result<Task, Status> {
        let message = GetTaskRequest { task_id };
        self.call(
            caller,
            &MetadataMap::new(),
            message,
            None,
            |mut c, r| async move { c.get_task(r).await },
        )
        .await
        .map(Response::into_inner)
    }

    /// WaitTask for at most `timeout`.
    pub async fn wait(
        &self,
        caller: &Caller,
        task_id: String,
        timeout: Duration,
    ) -> Result<Task, Status> {
        let message = WaitTaskRequest {
            task_id,
            timeout: prost_types::Duration::try_from(timeout).ok(),
        };
        // The deadline leaves the server time to answer after the wait.
        let deadline = timeout + Duration::from_secs(10);
        self.call(
            caller,
            &MetadataMap::new(),
            message,
            Some(deadline),
            |mut c, r| async move { c.wait_task(r).await },
        )
        .await
        .map(Response::into_inner)
    }

    /// CancelTask.
    pub async fn cancel(&self, caller: &Caller, task_id: String) -> Result<Task, Status> {
        let message = CancelTaskRequest { task_id };
        self.call(
            caller,
            &MetadataMap::new(),
            message,
            None,
            |mut c, r| async move { c.cancel_task(r).await },
        )
        .await
        .map(Response::into_inner)
    }

    /// ListTasks.
    pub async fn list(
        &self,
        caller: &Caller,
        message: ListTasksRequest,
    ) -> Result<ListTasksResponse, Status> {
        self.call(
            caller,
            &MetadataMap::new(),
            message,
            None,
            |mut c, r| async move { c.list_tasks(r).await },
        )
        .await
        .map(Response::into_inner)
    }

    /// Sends `message` with `metadata` as `caller`, trying again while it
    /// fails transiently and attempts are left.
    async fn call<M, T, F, Fut>(
        &self,
        caller: &Caller,
        metadata: &MetadataMap,
        message: M,
        deadline: Option<Duration>,
        mut send: F,
    ) -> Result<Response<T>, Status>
    where
        M: Clone,
        F: FnMut(TaskServiceClient<Grpc>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request =
                Request::from_parts(metadata.clone(), Default::default(), message.clone());
            if let Some(authorization) = &caller.authorization {
                request
                    .metadata_mut()
                    .insert(AUTHORIZATION, authorization.clone());
            }
            if let Some(connection) = &caller.connection {
                request.extensions_mut().insert(connection.clone());
            }
            if let Some(deadline) = deadline {
                request.set_timeout(deadline);
            }
            match send(self.client.clone(), request).await {
                Err(status) if attempt < self.attempts && is_transient(&status) => {
                    tokio::time::sleep(backoff(attempt, &status)).await;
                }
                answer => return answer,
            }
        }
    }
}

/// The wait before attempt `attempt + 1`: exponential from 100 ms to 2 s,
/// never shorter than the server's `RetryInfo`.
fn backoff(attempt: u32, status: &Status) -> Duration {
    let exponential = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(5))
        .min(Duration::from_secs(2));
    let asked = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .unwrap_or_default();
    exponential.max(asked)
}

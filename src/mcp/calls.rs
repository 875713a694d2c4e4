//! The calls the tools make: the TaskService's RPCs, sent through the very
//! gates and services every other surface uses, either in this process
//! (the server's `/mcp`) or over gRPC to a running server (`oncely mcp`).

use std::{convert::Infallible, time::Duration};

use tracing::Instrument;

use oncely_client::{
    RetryPolicy, backoff, is_transient,
    metadata::{AUTHORIZATION, IDEMPOTENCY_FALLBACK, IDEMPOTENCY_KEY},
};
use tonic::{
    Request, Response, Status,
    body::Body,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::Channel,
};
use tower::util::BoxCloneSyncService;

use crate::proto::tasks_v1::{
    CancelTaskRequest, CreateTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse,
    Task, WaitTaskRequest, task_service_client::TaskServiceClient,
};
use crate::{api::ConnectionInfo, idempotency::IdempotencyKey};

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
    /// How a call that fails transiently is tried again (the client
    /// library's rule: exponential backoff with full jitter, never sooner
    /// than the server's `RetryInfo`).
    retries: RetryPolicy,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("retries", &self.retries)
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
    /// The W3C trace context (`traceparent`, `tracestate`) of the HTTP
    /// request that carried the call, passed on with it.
    pub trace_context: Vec<(tonic::metadata::AsciiMetadataKey, AsciiMetadataValue)>,
    /// The `Idempotency-Key` of the HTTP request that carried the call, or
    /// why it is not a key.
    pub transport_key: Option<Result<IdempotencyKey, String>>,
}

/// The key a create is sent with.
#[derive(Debug, Clone, Copy)]
pub enum Keyed<'a> {
    /// This key.
    Key(&'a IdempotencyKey),
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
        // Each call in the span a gRPC call gets from the server (request
        // id, method, the caller's trace context), as it has no server.
        let spanned = tower::service_fn(move |request: http::Request<Body>| {
            let (service, method) = crate::api::asked(request.uri().path());
            let span = crate::telemetry::request_span(&request, service, method);
            let mut stack = stack.clone();
            async move {
                use tower::ServiceExt;
                stack.ready().await?.call(request).await
            }
            .instrument(span)
        });
        let service = tower::ServiceExt::map_err(spanned, |never: Infallible| -> TransportError {
            match never {}
        });
        Self {
            client: TaskServiceClient::new(BoxCloneSyncService::new(service)),
            retries: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
        }
    }

    /// A server over `channel`: a call that fails transiently (the
    /// connection, an unavailable store, a rate limit) is tried again, up to
    /// `attempts` times in all, with the same key.
    pub fn remote(channel: Channel, attempts: u32) -> Self {
        let service = tower::ServiceExt::map_err(channel, TransportError);
        Self {
            client: TaskServiceClient::new(BoxCloneSyncService::new(service)),
            retries: RetryPolicy {
                max_attempts: attempts.max(1),
                ..RetryPolicy::default()
            },
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
                // A key is visible ASCII, which metadata takes.
                let value = AsciiMetadataValue::try_from(key.as_str())
                    .map_err(|error| Status::invalid_argument(error.to_string()))?;
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
            for (name, value) in &caller.trace_context {
                request.metadata_mut().insert(name.clone(), value.clone());
            }
            if let Some(connection) = &caller.connection {
                request.extensions_mut().insert(connection.clone());
            }
            if let Some(deadline) = deadline {
                request.set_timeout(deadline);
            }
            match send(self.client.clone(), request).await {
                Err(status) if attempt < self.retries.max_attempts && is_transient(&status) => {
                    tokio::time::sleep(backoff(&self.retries, attempt, &status)).await;
                }
                answer => return answer,
            }
        }
    }
}

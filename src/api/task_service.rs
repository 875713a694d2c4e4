//! `tasks.v1.TaskService`.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use prost::Message;
use tonic::{Request, Response, Status, metadata::MetadataValue};
use uuid::Uuid;

use super::{ServiceError, timestamp};
use crate::{
    domain::{FieldViolation, Limits, NewTask, check_agent_id, json_to_struct},
    idempotency::{self, IdempotencyKey, KeyPolicy, KeySource, MissingKeyPolicy, Outcome},
    proto::tasks_v1::{
        CreateTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse, Task,
        task_service_server::TaskService,
    },
    storage::{StorageError, Store, TaskRow},
};

/// The response metadata that marks a replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The response metadata that says which rule deduplicated a CreateTask:
/// `header` (the `idempotency-key`) or `fingerprint` (no key).
pub const KEY_SOURCE_HEADER: &str = "idempotency-key-source";

/// The page size used when a request asks for 0.
const DEFAULT_PAGE_SIZE: i32 = 50;
/// The largest page; larger requests are clamped to it.
const MAX_PAGE_SIZE: i32 = 1000;

/// The TaskService implementation.
#[derive(Debug, Clone)]
pub struct TaskApi<S> {
    store: S,
    policy: KeyPolicy,
    limits: Limits,
}

impl<S: Store> TaskApi<S> {
    /// A service over `store` that remembers requests as `policy` says.
    pub fn new(store: S, policy: KeyPolicy, limits: Limits) -> Self {
        Self {
            store,
            policy,
            limits,
        }
    }

    async fn create(
        &self,
        source: KeySource<'_>,
        request: CreateTaskRequest,
    ) -> Result<Response<Task>, ServiceError> {
        if source == KeySource::Fingerprint && self.policy.missing_key == MissingKeyPolicy::Reject {
            return Err(ServiceError::KeyMissing);
        }
        let task = NewTask::parse(request, &self.limits).map_err(ServiceError::InvalidRequest)?;
        tracing::Span::current().record("agent_id", task.agent_id.as_str());

        let outcome = idempotency::create_task(&self.store, source, &task, &self.policy).await?;
        let (task, replayed) = match outcome {
            Outcome::Created(task) => (task, false),
            Outcome::Replayed(bytes) => (
                Task::decode(bytes.as_slice())
                    .map_err(|e| StorageError::Corrupt(format!("stored response: {e}")))?,
                true,
            ),
            Outcome::Mismatch => return Err(ServiceError::KeyReused),
            Outcome::InFlight => return Err(ServiceError::InProgress),
        };
        let span = tracing::Span::current();
        span.record("outcome", if replayed { "replayed" } else { "created" });
        span.record("task_id", task.task_id.as_str());
        let mut response = Response::new(task);
        response.metadata_mut().insert(
            REPLAYED_HEADER,
            MetadataValue::from_static(if replayed { "true" } else { "false" }),
        );
        Ok(response)
    }

    async fn get(&self, request: GetTaskRequest) -> Result<Task, ServiceError> {
        let task_id = Uuid::parse_str(&request.task_id)
            .map_err(|_| invalid("task_id", format!("{:?} is not a UUID", request.task_id)))?;
        let row = self.store.get_task(task_id).await?;
        let row = row.ok_or_else(|| ServiceError::NotFound(format!("no task has id {task_id}")))?;
        task_from_row(row)
    }

    async fn list(&self, request: ListTasksRequest) -> Result<ListTasksResponse, ServiceError> {
        let mut violations = Vec::new();
        if let Err(v) = check_agent_id(&request.agent_id) {
            violations.push(v);
        }
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                violations.push(violation(
                    "page_size",
                    format!("page_size is {n}; send 0 for the default or a positive number"),
                ));
                0
            }
            n => n.min(MAX_PAGE_SIZE),
        };
        let after_seq = match decode_page_token(&request.page_token) {
            Some(seq) => seq,
            None => {
                violations.push(violation(
                    "page_token",
                    "page_token is not one this service issued; send the next_page_token of the previous page, or nothing",
                ));
                0
            }
        };
        if !violations.is_empty() {
            return Err(ServiceError::InvalidRequest(violations));
        }

        // One extra row tells whether another page follows.
        let mut rows = self
            .store
            .list_tasks(&request.agent_id, after_seq, i64::from(page_size) + 1)
            .await?;
        let next_page_token = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last()
                .map(|row| encode_page_token(row.seq))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListTasksResponse {
            tasks: rows
                .into_iter()
                .map(task_from_row)
                .collect::<Result<_, _>>()?,
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl<S: Store> TaskService for TaskApi<S> {
    #[tracing::instrument(
        name = "CreateTask",
        skip_all,
        fields(rpc.method = "CreateTask", key_source, outcome, agent_id, task_id)
    )]
    async fn create_task(
        &self,
        request: Request<CreateTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        // The key layer puts a valid key there, or none when the policy lets
        // keyless requests through.
        let key = request.extensions().get::<IdempotencyKey>().cloned();
        let source = key
            .as_ref()
            .map_or(KeySource::Fingerprint, KeySource::Header);
        tracing::Span::current().record("key_source", source.as_str());
        let result = finish(self.create(source, request.into_inner()).await);
        let source_value = MetadataValue::from_static(source.as_str());
        match result {
            Ok(mut response) => {
                response
                    .metadata_mut()
                    .insert(KEY_SOURCE_HEADER, source_value);
                Ok(response)
            }
            Err(mut status) => {
                status
                    .metadata_mut()
                    .insert(KEY_SOURCE_HEADER, source_value);
                Err(status)
            }
        }
    }

    #[tracing::instrument(name = "GetTask", skip_all, fields(rpc.method = "GetTask", outcome))]
    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let result = self.get(request.into_inner()).await;
        finish(result.map(|task| ok(Response::new(task))))
    }

    #[tracing::instrument(name = "ListTasks", skip_all, fields(rpc.method = "ListTasks", outcome))]
    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let result = self.list(request.into_inner()).await;
        finish(result.map(|page| ok(Response::new(page))))
    }
}

/// Records the outcome of an RPC in its span, logs it, and maps errors.
pub(super) fn finish<T>(result: Result<Response<T>, ServiceError>) -> Result<Response<T>, Status> {
    let span = tracing::Span::current();
    match result {
        Ok(response) => {
            tracing::info!("done");
            Ok(response)
        }
        Err(error) => {
            span.record("outcome", error.outcome());
            tracing::info!(error = %error, "failed");
            Err(error.into())
        }
    }
}

/// Records the outcome of a read that succeeded.
fn ok<T>(response: T) -> T {
    tracing::Span::current().record("outcome", "ok");
    response
}

fn violation(field: &str, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

fn invalid(field: &str, description: impl Into<String>) -> ServiceError {
    ServiceError::InvalidRequest(vec![violation(field, description)])
}

fn task_from_row(row: TaskRow) -> Result<Task, ServiceError> {
    let parameters = match row.parameters {
        serde_json::Value::Object(map) => json_to_struct(&map),
        other => {
            return Err(StorageError::Corrupt(format!(
                "task {} has non-object parameters {other}",
                row.task_id
            ))
            .into());
        }
    };
    let result = match row.result {
        None => None,
        Some(serde_json::Value::Object(map)) => Some(json_to_struct(&map)),
        Some(other) => {
            return Err(StorageError::Corrupt(format!(
                "task {} has non-object result {other}",
                row.task_id
            ))
            .into());
        }
    };
    Ok(Task {
        task_id: row.task_id.to_string(),
        agent_id: row.agent_id,
        action: row.action,
        parameters: Some(parameters),
        status: i32::from(row.status),
        create_time: Some(timestamp(row.create_time)),
        result,
    })
}

const PAGE_TOKEN_PREFIX: &str = "v1:";

fn encode_page_token(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{seq}"))
}

/// The `seq` after which the page starts; 0 for an empty token, `None` for a
/// token this service did not issue.
fn decode_page_token(token: &str) -> Option<i64> {
    if token.is_empty() {
        return Some(0);
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    text.strip_prefix(PAGE_TOKEN_PREFIX)?
        .parse()
        .ok()
        .filter(|seq| *seq > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_foreign_tokens_are_refused() {
        assert_eq!(decode_page_token(""), Some(0));
        assert_eq!(decode_page_token(&encode_page_token(42)), Some(42));
        assert_eq!(decode_page_token("42"), None);
        assert_eq!(decode_page_token(&URL_SAFE_NO_PAD.encode("v1:-3")), None);
    }
}

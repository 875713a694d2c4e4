//! The tools: their names, what the model is told about them, their
//! arguments and answers (whose JSON Schemas are derived from the types
//! below), and their annotations.

use std::{borrow::Cow, sync::Arc};

use rmcp::{
    handler::server::common::{schema_for_output, schema_for_type},
    model::{Tool, ToolAnnotations},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::proto::tasks_v1::{Task, TaskStatus};

/// The tool that creates a task.
pub const CREATE_TASK: &str = "create_task";
/// The tool that reads a task.
pub const GET_TASK: &str = "get_task";
/// The tool that waits for a task to finish.
pub const WAIT_TASK: &str = "wait_task";
/// The tool that cancels a task.
pub const CANCEL_TASK: &str = "cancel_task";
/// The tool that lists an agent's tasks.
pub const LIST_TASKS: &str = "list_tasks";

/// The arguments of `create_task`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskArgs {
    /// The agent the task is for (an agent key may only name its own agents).
    pub agent_id: String,
    /// What the worker is to do, such as `send_email` or `charge_card`.
    pub action: String,
    /// The action's inputs, a JSON object.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// A key for this one request, such as a UUID v4 generated before the
    /// first attempt: send the same key with the same arguments on every
    /// retry of this request, and a new key for a new request.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// The arguments of `get_task` and `cancel_task`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskIdArgs {
    /// The task's id, as `create_task` returned it.
    pub task_id: String,
}

/// The arguments of `wait_task`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitTaskArgs {
    /// The task's id, as `create_task` returned it.
    pub task_id: String,
    /// How long to wait for the task to finish, in seconds (0 to 60; 0
    /// answers at once).
    #[schemars(range(min = 0, max = 60))]
    pub timeout_seconds: u32,
}

/// The arguments of `list_tasks`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListTasksArgs {
    /// The agent whose tasks to list.
    pub agent_id: String,
    /// The most tasks on one page (1 to 100, more is cut to 100; 50 when
    /// left out).
    #[serde(default)]
    #[schemars(range(min = 1, max = 100))]
    pub page_size: Option<u32>,
    /// The `next_page_token` of the previous page, for the next one.
    #[serde(default)]
    pub page_token: Option<String>,
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// A worker holds it.
    Running,
    /// Done; `result` holds what the worker returned.
    Succeeded,
    /// Ended without success; `error_message` says why.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
}

/// A task, as every tool answers it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskView {
    /// The task's id.
    pub task_id: String,
    /// The agent it is for.
    pub agent_id: String,
    /// What the worker is to do.
    pub action: String,
    /// The action's inputs.
    pub parameters: Map<String, Value>,
    /// Where the task is.
    pub status: Status,
    /// Whether the task has finished (succeeded, failed or cancelled).
    pub finished: bool,
    /// What the worker returned, once the task succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Map<String, Value>>,
    /// Why the last attempt failed, or why the task failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// How many times a worker has taken the task.
    pub attempt: i32,
    /// When the task was created (RFC 3339).
    pub create_time: String,
    /// When the task last changed (RFC 3339).
    pub update_time: String,
}

/// Where the key that deduplicated a `create_task` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// The `idempotency_key` argument.
    Argument,
    /// The transport: the `Idempotency-Key` header of the HTTP request that
    /// carried the call.
    Transport,
    /// No key: the arguments' fingerprint, within the server's dedup window.
    Fingerprint,
}

/// The answer of `create_task`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CreateTaskOutput {
    /// The task.
    pub task: TaskView,
    /// True when an earlier call with this key (or an earlier attempt of
    /// this very call) created the task, and nothing was created now. Absent
    /// only in the result of an MCP task handle (`tasks/get`), which told it
    /// when the handle was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
    /// What the call was deduplicated by; absent as `replayed` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_source: Option<KeySource>,
    /// The key used, to send again on a retry; absent for `fingerprint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The answer of `get_task`, `wait_task` and `cancel_task`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskOutput {
    /// The task.
    pub task: TaskView,
}

/// The answer of `list_tasks`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ListTasksOutput {
    /// The tasks on this page, oldest first.
    pub tasks: Vec<TaskView>,
    /// The token for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// The tools, as `tools/list` answers them.
pub fn all() -> Vec<Tool> {
    vec![
        tool::<CreateTaskArgs, CreateTaskOutput>(
            CREATE_TASK,
            "Create a task",
            "Create a task: a worker performs the action (send an email, charge a card, \
             call an API) exactly once, however often this call is repeated. Pass an \
             idempotency_key, a new UUID v4 for each new request; when you retry this \
             call (after a timeout, an error, or when unsure whether it went through), \
             send the SAME idempotency_key with the SAME arguments: the retry returns \
             the task the first call created, with replayed=true, and nothing is done \
             twice. Never reuse a key for a different request. Without a key, an \
             identical call within the server's dedup window counts as a retry. The \
             task runs in the background: call wait_task for its result.",
            // Not idempotent by hint (each new key is a new task), but safe
            // to retry with its key.
            ToolAnnotations::with_title("Create a task (safe to retry with its idempotency_key)")
                .read_only(false)
                .destructive(false)
                .idempotent(false)
                .open_world(true),
        ),
        tool::<TaskIdArgs, TaskOutput>(
            GET_TASK,
            "Get a task",
            "Read a task: its status and, once it succeeded, its result.",
            read_only("Get a task"),
        ),
        tool::<WaitTaskArgs, TaskOutput>(
            WAIT_TASK,
            "Wait for a task",
            "Wait up to timeout_seconds (at most 60) for a task to finish, and return \
             it: finished=true with its result or error, or finished=false if it is \
             still running (call wait_task again).",
            read_only("Wait for a task"),
        ),
        tool::<TaskIdArgs, TaskOutput>(
            CANCEL_TASK,
            "Cancel a task",
            "Cancel a task that has not finished: no worker starts it after this. A \
             finished task is returned unchanged. Safe to repeat.",
            ToolAnnotations::with_title("Cancel a task")
                .read_only(false)
                .destructive(true)
                .idempotent(true)
                .open_world(false),
        ),
        tool::<ListTasksArgs, ListTasksOutput>(
            LIST_TASKS,
            "List tasks",
            "List an agent's tasks in the order they were created, oldest first, a page \
             at a time.",
            read_only("List tasks"),
        ),
    ]
}

/// The annotations of a tool that only reads.
fn read_only(title: &str) -> ToolAnnotations {
    ToolAnnotations::with_title(title.to_owned())
        .read_only(true)
        .destructive(false)
        .idempotent(true)
        .open_world(false)
}

/// A tool taking `A` and answering `O`.
fn tool<A: JsonSchema + 'static, O: JsonSchema + 'static>(
    name: &'static str,
    title: &'static str,
    description: &'static str,
    annotations: ToolAnnotations,
) -> Tool {
    Tool::new(
        Cow::Borrowed(name),
        Cow::Borrowed(description),
        schema_for_type::<A>(),
    )
    .with_title(title)
    .with_raw_output_schema(schema_for_output::<O>())
    .with_annotations(annotations)
}

/// The JSON Schema of a tool's arguments, for tests and documentation.
pub fn input_schema(name: &str) -> Option<Arc<Map<String, Value>>> {
    all()
        .into_iter()
        .find(|tool| tool.name == name)
        .map(|tool| tool.input_schema)
}

impl TaskView {
    /// The view of a task as the services answer it.
    pub fn of(task: &Task) -> Self {
        let status = match TaskStatus::try_from(task.status) {
            Ok(TaskStatus::Running) => Status::Running,
            Ok(TaskStatus::Succeeded) => Status::Succeeded,
            Ok(TaskStatus::Failed) => Status::Failed,
            Ok(TaskStatus::Cancelled) => Status::Cancelled,
            Ok(TaskStatus::Queued | TaskStatus::Unspecified) | Err(_) => Status::Queued,
        };
        Self {
            task_id: task.task_id.clone(),
            agent_id: task.agent_id.clone(),
            action: task.action.clone(),
            parameters: task
                .parameters
                .as_ref()
                .map(oncely_client::json::from_struct)
                .unwrap_or_default(),
            status,
            finished: matches!(
                status,
                Status::Succeeded | Status::Failed | Status::Cancelled
            ),
            result: task.result.as_ref().map(oncely_client::json::from_struct),
            error_message: Some(task.error_message.clone()).filter(|m| !m.is_empty()),
            attempt: task.attempt,
            create_time: rfc3339(task.create_time.as_ref()),
            update_time: rfc3339(task.update_time.as_ref()),
        }
    }
}

/// A protobuf timestamp as RFC 3339 in UTC, to the millisecond; empty when
/// absent.
fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::requests::MAX_WAIT;

    #[test]
    fn the_wait_schema_bounds_the_wait_as_the_server_does() {
        let schema = input_schema(WAIT_TASK).expect("wait_task");
        let timeout = &schema["properties"]["timeout_seconds"];
        assert_eq!(timeout["maximum"], MAX_WAIT.as_secs(), "{timeout}");
        assert_eq!(timeout["minimum"], 0);
    }

    #[test]
    fn every_tool_takes_an_object_and_answers_one() {
        for tool in all() {
            assert_eq!(tool.input_schema["type"], "object", "{}", tool.name);
            let output = tool.output_schema.expect("an output schema");
            assert_eq!(output["type"], "object", "{}", tool.name);
        }
    }
}

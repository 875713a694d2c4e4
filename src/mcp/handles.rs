//! The MCP tasks extension (SEP-2663, `io.modelcontextprotocol/tasks`), for
//! clients that declare it: `create_task` answers a task handle whose id is
//! the oncely task's, `tasks/get` reads the task (GetTask) and `tasks/cancel`
//! cancels it (CancelTask), so a client polls or cancels the work itself
//! through MCP. Clients without the extension call `wait_task`, the long
//! poll, instead.

use rmcp::{
    ErrorData,
    model::{
        CallToolResult, ContentBlock, CreateTaskResult, DetailedTask, MetaObject, Task,
        TaskPayload, TaskStatus,
    },
};
use serde_json::{Map, Value, json};
use tonic::{Code, Status};

use super::{
    handler::{Retry, answer, refusal},
    tools::{CreateTaskOutput, Status as State, TaskView},
};

/// How often a client is asked to poll a task that has not finished.
const POLL_INTERVAL_MS: u64 = 1_000;

/// The handle `create_task` answers: the task's state, whether the call was
/// a replay and what keyed it (in the status message and in `_meta`).
pub(super) fn created(output: &CreateTaskOutput) -> CreateTaskResult {
    let mut task = handle(&output.task);
    let replayed = output.replayed.unwrap_or(false);
    if replayed {
        task.status_message = Some(format!(
            "{} (replayed: an earlier call with the same key created this task)",
            task.status_message.unwrap_or_default()
        ));
    }
    let mut meta = Map::new();
    meta.insert("io.oncely/replayed".into(), json!(replayed));
    meta.insert("io.oncely/key_source".into(), json!(output.key_source));
    if let Some(key) = &output.idempotency_key {
        meta.insert("io.oncely/idempotency_key".into(), json!(key));
    }
    let mut result = CreateTaskResult::new(task);
    result.meta = Some(MetaObject(meta));
    result
}

/// The task as `tasks/get` answers it: working until it finishes; then
/// completed with the tool result `get_task` would give (an error result
/// when the task failed), or cancelled.
pub(super) fn detailed(view: &TaskView) -> DetailedTask {
    let payload = match view.status {
        State::Queued | State::Running => TaskPayload::Working,
        State::Cancelled => TaskPayload::Cancelled,
        // The result of the `create_task` call the handle stands for.
        State::Succeeded => completed(answer(&CreateTaskOutput {
            task: view.clone(),
            replayed: None,
            key_source: None,
            idempotency_key: None,
        })),
        State::Failed => {
            completed(super::handler::tool_error(
                &format!(
                    "the task failed: {}",
                    view.error_message.as_deref().unwrap_or("no reason given")
                ),
                "TASK_FAILED",
                Code::FailedPrecondition,
                None,
                // A retry with the key replays this task.
                false,
            ))
        }
    };
    DetailedTask::new(handle(view), payload)
}

/// The refusal of `tasks/get` or `tasks/cancel`, which are protocol
/// requests: a JSON-RPC error carrying the tool error's words.
pub(super) fn protocol_error(status: &Status) -> ErrorData {
    let refused = refusal(status, Retry::Plain);
    let message = refused
        .content
        .first()
        .and_then(|block| block.as_text())
        .map_or_else(|| status.message().to_owned(), |text| text.text.clone());
    let data = refused.structured_content;
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied => {
            ErrorData::invalid_params(message, data)
        }
        _ => ErrorData::internal_error(message, data),
    }
}

/// The extension's task for an oncely task.
fn handle(view: &TaskView) -> Task {
    let status = match view.status {
        State::Queued | State::Running => TaskStatus::Working,
        State::Succeeded | State::Failed => TaskStatus::Completed,
        State::Cancelled => TaskStatus::Cancelled,
    };
    let message = match view.status {
        State::Queued => "queued: waiting for a worker".to_owned(),
        State::Running => format!("running: attempt {}", view.attempt),
        State::Succeeded => "succeeded".to_owned(),
        State::Failed => "failed".to_owned(),
        State::Cancelled => "cancelled".to_owned(),
    };
    let mut task = Task::new(
        view.task_id.clone(),
        status,
        view.create_time.clone(),
        view.update_time.clone(),
    )
    .with_status_message(message);
    if !status.is_terminal() {
        task = task.with_poll_interval_ms(POLL_INTERVAL_MS);
    }
    task
}

/// A completed payload holding `result`.
fn completed(result: CallToolResult) -> TaskPayload {
    let result = match serde_json::to_value(result) {
        Ok(Value::Object(object)) => object,
        _ => {
            let fallback = CallToolResult::error(vec![ContentBlock::text(
                "the task's result could not be written as JSON",
            )]);
            match serde_json::to_value(fallback) {
                Ok(Value::Object(object)) => object,
                _ => Map::new(),
            }
        }
    };
    TaskPayload::Completed { result }
}

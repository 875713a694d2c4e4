//! The MCP server: `tools/list` and `tools/call`, each call made as the
//! caller through [`Tasks`], its outcome answered as MCP expects: a result,
//! or a tool error (`isError`) the model can read and act on.

use std::{sync::Arc, time::Duration};

use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
        GetTaskParams, GetTaskResult, Implementation, ListToolsResult, PaginatedRequestParams,
        ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tonic::{Code, Status, metadata::AsciiMetadataValue};
use tonic_types::StatusExt;

use super::{
    calls::{Caller, Keyed, Tasks},
    handles,
    tools::{
        self, CreateTaskArgs, CreateTaskOutput, KeySource, ListTasksArgs, ListTasksOutput,
        TaskIdArgs, TaskOutput, TaskView, WaitTaskArgs,
    },
};
use crate::{
    api::{ConnectionInfo, code_name},
    domain::requests::MAX_WAIT,
    proto::tasks_v1::{CreateTaskRequest, ListTasksRequest},
};

/// What the server tells a model about itself when it connects.
const INSTRUCTIONS: &str = "oncely performs side effects exactly once. Call create_task \
     with an idempotency_key (a new UUID v4 per request) and, when you retry, send the same \
     key with the same arguments: you get the first task back (replayed=true) and nothing \
     happens twice. Then call wait_task for the result.";

/// The most tasks a `list_tasks` page holds.
const MAX_PAGE_SIZE: u32 = 100;

/// The oncely MCP server; see the module.
#[derive(Debug, Clone)]
pub struct OncelyMcp {
    tasks: Tasks,
    /// Who calls when the transport does not say (stdio: the bridge's own
    /// API key).
    caller: Caller,
    tools: Arc<Vec<Tool>>,
}

impl OncelyMcp {
    /// A server calling `tasks`, as `caller` unless a request's HTTP
    /// headers say otherwise.
    pub fn new(tasks: Tasks, caller: Caller) -> Self {
        Self {
            tasks,
            caller,
            tools: Arc::new(tools::all()),
        }
    }

    /// Who makes the request of `context`: its HTTP request's API key,
    /// `Idempotency-Key` and peer, when it came over HTTP.
    fn caller(&self, context: &RequestContext<RoleServer>) -> Caller {
        let Some(parts) = context.extensions.get::<http::request::Parts>() else {
            return self.caller.clone();
        };
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        Caller {
            authorization: parts
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|value| AsciiMetadataValue::try_from(value.as_bytes()).ok()),
            connection: parts
                .extensions
                .get::<axum::extract::ConnectInfo<ConnectionInfo>>()
                .map(|info| info.0.clone()),
            // The draft writes the key as a structured-field string.
            transport_key: header(oncely_client::metadata::IDEMPOTENCY_KEY).map(|key| {
                let key = key.trim();
                key.strip_prefix('"')
                    .and_then(|k| k.strip_suffix('"'))
                    .unwrap_or(key)
                    .to_owned()
            }),
        }
    }

    /// `create_task`: the task and how it was keyed, or the tool error.
    async fn create_task(
        &self,
        caller: &Caller,
        arguments: Value,
    ) -> Result<CreateTaskOutput, CallToolResult> {
        let args: CreateTaskArgs = parse(tools::CREATE_TASK, arguments)?;
        let (key, source) = match (&args.idempotency_key, &caller.transport_key) {
            (Some(key), _) => (Some(key.clone()), KeySource::Argument),
            (None, Some(key)) => (Some(key.clone()), KeySource::Transport),
            (None, None) => (None, KeySource::Fingerprint),
        };
        let message = CreateTaskRequest {
            agent_id: args.agent_id,
            action: args.action,
            parameters: Some(oncely_client::json::object_to_struct(&args.parameters)),
        };
        let keyed = key.as_deref().map_or(Keyed::Fingerprint, Keyed::Key);
        match self.tasks.create(caller, keyed, message).await {
            Ok((task, replayed)) => Ok(CreateTaskOutput {
                task: TaskView::of(&task),
                replayed,
                key_source: source,
                idempotency_key: key,
            }),
            Err(status) => Err(refusal(&status, source)),
        }
    }

    async fn get_task(&self, caller: &Caller, arguments: Value) -> CallToolResult {
        let args: TaskIdArgs = match parse(tools::GET_TASK, arguments) {
            Ok(args) => args,
            Err(refused) => return refused,
        };
        task_answer(self.tasks.get(caller, args.task_id).await)
    }

    async fn wait_task(&self, caller: &Caller, arguments: Value) -> CallToolResult {
        let args: WaitTaskArgs = match parse(tools::WAIT_TASK, arguments) {
            Ok(args) => args,
            Err(refused) => return refused,
        };
        if Duration::from_secs(u64::from(args.timeout_seconds)) > MAX_WAIT {
            return tool_error(
                &format!(
                    "invalid argument timeout_seconds for wait_task: {} is more than the {} a \
                     wait may take; call wait_task again to wait longer",
                    args.timeout_seconds,
                    MAX_WAIT.as_secs()
                ),
                "INVALID_ARGUMENTS",
                Code::InvalidArgument,
                None,
            );
        }
        let timeout = Duration::from_secs(u64::from(args.timeout_seconds));
        task_answer(self.tasks.wait(caller, args.task_id, timeout).await)
    }

    async fn cancel_task(&self, caller: &Caller, arguments: Value) -> CallToolResult {
        let args: TaskIdArgs = match parse(tools::CANCEL_TASK, arguments) {
            Ok(args) => args,
            Err(refused) => return refused,
        };
        task_answer(self.tasks.cancel(caller, args.task_id).await)
    }

    async fn list_tasks(&self, caller: &Caller, arguments: Value) -> CallToolResult {
        let args: ListTasksArgs = match parse(tools::LIST_TASKS, arguments) {
            Ok(args) => args,
            Err(refused) => return refused,
        };
        let page_size = args.page_size.map_or(0, |n| n.clamp(1, MAX_PAGE_SIZE));
        let message = ListTasksRequest {
            agent_id: args.agent_id,
            page_size: i32::try_from(page_size).unwrap_or(0),
            page_token: args.page_token.unwrap_or_default(),
        };
        match self.tasks.list(caller, message).await {
            Ok(page) => answer(&ListTasksOutput {
                tasks: page.tasks.iter().map(TaskView::of).collect(),
                next_page_token: Some(page.next_page_token).filter(|t| !t.is_empty()),
            }),
            Err(status) => refusal(&status, KeySource::Argument),
        }
    }
}

impl ServerHandler for OncelyMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
        .with_server_info(
            Implementation::new("oncely", env!("CARGO_PKG_VERSION"))
                .with_title("oncely: side effects exactly once"),
        )
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        let caller = self.caller(&context);
        match self.tasks.get(&caller, request.task_id).await {
            Ok(task) => Ok(GetTaskResult::new(handles::detailed(&TaskView::of(&task)))),
            Err(status) => Err(handles::protocol_error(&status)),
        }
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let caller = self.caller(&context);
        match self.tasks.cancel(&caller, request.task_id).await {
            Ok(_) => Ok(()),
            Err(status) => Err(handles::protocol_error(&status)),
        }
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tools.iter().find(|tool| tool.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = self.caller(&context);
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        let result = match request.name.as_ref() {
            tools::CREATE_TASK => {
                let created = self.create_task(&caller, arguments).await;
                // A client of the MCP tasks extension gets a task handle to
                // poll (tasks/get) or cancel (tasks/cancel): the oncely task.
                let handles = context
                    .client_capabilities()
                    .is_some_and(|capabilities| capabilities.supports_tasks());
                match created {
                    Ok(output) if handles => {
                        return Ok(CallToolResponse::Task(handles::created(&output)));
                    }
                    Ok(output) => answer(&output),
                    Err(refused) => refused,
                }
            }
            tools::GET_TASK => self.get_task(&caller, arguments).await,
            tools::WAIT_TASK => {
                // A client that gives up cancels the wait.
                tokio::select! {
                    result = self.wait_task(&caller, arguments) => result,
                    () = context.ct.cancelled() => {
                        return Err(ErrorData::internal_error("the call was cancelled", None));
                    }
                }
            }
            tools::CANCEL_TASK => self.cancel_task(&caller, arguments).await,
            tools::LIST_TASKS => self.list_tasks(&caller, arguments).await,
            other => {
                return Err(ErrorData::invalid_params(
                    format!(
                        "no tool {other:?}: oncely has create_task, get_task, wait_task, cancel_task and list_tasks"
                    ),
                    None,
                ));
            }
        };
        tracing::debug!(tool = %request.name, is_error = ?result.is_error, "MCP tool call");
        Ok(CallToolResponse::Complete(result))
    }
}

/// The arguments of `tool` as `T`, or a tool error naming the argument at
/// fault.
fn parse<T: DeserializeOwned>(tool: &str, arguments: Value) -> Result<T, CallToolResult> {
    serde_path_to_error::deserialize(arguments).map_err(|error| {
        let path = error.path().to_string();
        let message = if path == "." {
            format!("invalid arguments for {tool}: {}", error.inner())
        } else {
            format!("invalid argument {path} for {tool}: {}", error.inner())
        };
        tool_error(&message, "INVALID_ARGUMENTS", Code::InvalidArgument, None)
    })
}

/// A successful result holding `output`.
pub(super) fn answer<T: Serialize>(output: &T) -> CallToolResult {
    match serde_json::to_value(output) {
        Ok(value) => CallToolResult::structured(value),
        Err(error) => tool_error(
            &format!("the answer could not be written as JSON: {error}"),
            "INTERNAL",
            Code::Internal,
            None,
        ),
    }
}

/// The result of a call that answers one task.
fn task_answer(result: Result<crate::proto::tasks_v1::Task, Status>) -> CallToolResult {
    match result {
        Ok(task) => answer(&TaskOutput {
            task: TaskView::of(&task),
        }),
        Err(status) => refusal(&status, KeySource::Argument),
    }
}

/// The tool error for a call the service refused, in words for the model:
/// what happened and what to do.
pub(super) fn refusal(status: &Status, source: KeySource) -> CallToolResult {
    let reason = status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| code_name(status.code()).to_owned());
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    let key = match source {
        KeySource::Transport => "the Idempotency-Key header",
        _ => "idempotency_key",
    };
    let message = match reason.as_str() {
        "IDEMPOTENCY_KEY_REUSED" => format!(
            "conflict: {key} was already used with different arguments (agent_id, action or \
             parameters). To retry that earlier request, send exactly its arguments; for a new \
             request, use a new idempotency_key."
        ),
        "IDEMPOTENCY_REQUEST_IN_PROGRESS" => format!(
            "the first call with this {key} is still running; retry this same call with the \
             same key in a second or two."
        ),
        "IDEMPOTENCY_KEY_INVALID" => format!("{key} is invalid: {}", status.message()),
        "DATABASE_UNAVAILABLE" => "oncely's task store is unavailable right now; retry this \
             same call (with the same idempotency_key) in a few seconds: nothing is done twice."
            .to_owned(),
        _ => match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled => format!(
                "oncely is unavailable right now ({}); retry this same call (with the same \
                 idempotency_key) in a few seconds: nothing is done twice.",
                status.message()
            ),
            Code::DeadlineExceeded => format!(
                "{}; retry this same call (with the same idempotency_key): nothing is done twice.",
                status.message().trim_end_matches(['.', ';'])
            ),
            _ => status.message().to_owned(),
        },
    };
    tool_error(&message, &reason, status.code(), retry_after)
}

/// A tool error: `message` for the model, and the same facts as JSON.
pub(super) fn tool_error(
    message: &str,
    reason: &str,
    code: Code,
    retry_after: Option<Duration>,
) -> CallToolResult {
    let retryable = matches!(
        code,
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded | Code::Cancelled
    ) || retry_after.is_some();
    let mut result = CallToolResult::error(vec![ContentBlock::text(message.to_owned())]);
    let mut error = json!({
        "reason": reason,
        "code": code_name(code),
        "message": message,
        "retryable": retryable,
    });
    if let (Some(wait), Some(object)) = (retry_after, error.as_object_mut()) {
        object.insert("retry_after_seconds".to_owned(), json!(wait.as_secs_f64()));
    }
    result.structured_content = Some(json!({ "error": error }));
    result
}

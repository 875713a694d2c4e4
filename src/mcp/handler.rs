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
    api::{ConnectionInfo, IDEMPOTENCY_KEY, code_name},
    domain::requests::MAX_WAIT,
    idempotency::IdempotencyKey,
    proto::tasks_v1::{CreateTaskRequest, ListTasksRequest},
};

/// What the server tells a model about itself when it connects.
const INSTRUCTIONS: &str = "oncely performs side effects exactly once. Call create_task \
     with an idempotency_key (a new UUID v4 per request) and, when you retry, send the same \
     key with the same arguments: you get the first task back (replayed=true) and nothing \
     happens twice. Then call wait_task for the result.";

/// The most tasks a `list_tasks` page holds.
const MAX_PAGE_SIZE: u32 = 100;

/// A tool's result: `Err` is a tool error returned early (the same
/// `CallToolResult`, marked `isError`).
type Answer = Result<CallToolResult, CallToolResult>;

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
        // The header's key read as every surface reads it.
        let mut keys = http::HeaderMap::new();
        for value in parts.headers.get_all(IDEMPOTENCY_KEY) {
            keys.append(IDEMPOTENCY_KEY, value.clone());
        }
        crate::api::json::unquote_idempotency_key(&mut keys);
        Caller {
            authorization: parts
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|value| AsciiMetadataValue::try_from(value.as_bytes()).ok())
                .map(|mut value| {
                    value.set_sensitive(true);
                    value
                }),
            connection: parts
                .extensions
                .get::<axum::extract::ConnectInfo<ConnectionInfo>>()
                .map(|info| info.0.clone()),
            trace_context: ["traceparent", "tracestate"]
                .into_iter()
                .filter_map(|name| {
                    let value = parts.headers.get(name)?;
                    Some((
                        tonic::metadata::AsciiMetadataKey::from_static(name),
                        AsciiMetadataValue::try_from(value.as_bytes()).ok()?,
                    ))
                })
                .collect(),
            transport_key: crate::api::key_from_headers(&keys)
                .map_err(|error| error.to_string())
                .transpose(),
        }
    }

    /// `create_task`: the task and how it was keyed, or the tool error.
    async fn create_task(
        &self,
        caller: &Caller,
        arguments: Value,
    ) -> Result<CreateTaskOutput, CallToolResult> {
        let args: CreateTaskArgs = parse(tools::CREATE_TASK, arguments)?;
        let invalid = |what: &str, error: &str| {
            tool_error(
                &format!("{what} is invalid: {error}"),
                "IDEMPOTENCY_KEY_INVALID",
                Code::InvalidArgument,
                None,
                false,
            )
        };
        let (key, source) = match (&args.idempotency_key, &caller.transport_key) {
            (Some(key), _) => match IdempotencyKey::try_from(key.as_str()) {
                Ok(key) => (Some(key), KeySource::Argument),
                Err(error) => return Err(invalid("idempotency_key", &error.to_string())),
            },
            (None, Some(Ok(key))) => (Some(key.clone()), KeySource::Transport),
            (None, Some(Err(error))) => return Err(invalid("the Idempotency-Key header", error)),
            (None, None) => (None, KeySource::Fingerprint),
        };
        let message = CreateTaskRequest {
            agent_id: args.agent_id,
            action: args.action,
            parameters: Some(oncely_client::json::object_to_struct(&args.parameters)),
        };
        let (keyed, retry) = match &key {
            Some(key) => (Keyed::Key(key), Retry::Key(key.as_str(), source)),
            None => (Keyed::Fingerprint, Retry::Fingerprint),
        };
        match self.tasks.create(caller, keyed, message).await {
            Ok((task, replayed)) => Ok(CreateTaskOutput {
                task: TaskView::of(&task),
                replayed: Some(replayed),
                key_source: Some(source),
                idempotency_key: key.map(|key| key.as_str().to_owned()),
            }),
            Err(status) => Err(refusal(&status, retry)),
        }
    }

    async fn get_task(&self, caller: &Caller, arguments: Value) -> Answer {
        let args: TaskIdArgs = parse(tools::GET_TASK, arguments)?;
        Ok(task_answer(self.tasks.get(caller, args.task_id).await))
    }

    async fn wait_task(&self, caller: &Caller, arguments: Value) -> Answer {
        let args: WaitTaskArgs = parse(tools::WAIT_TASK, arguments)?;
        if Duration::from_secs(u64::from(args.timeout_seconds)) > MAX_WAIT {
            return Err(tool_error(
                &format!(
                    "invalid argument timeout_seconds for wait_task: {} is more than the {} a \
                     wait may take; call wait_task again to wait longer",
                    args.timeout_seconds,
                    MAX_WAIT.as_secs()
                ),
                "INVALID_ARGUMENTS",
                Code::InvalidArgument,
                None,
                false,
            ));
        }
        let timeout = Duration::from_secs(u64::from(args.timeout_seconds));
        Ok(task_answer(
            self.tasks.wait(caller, args.task_id, timeout).await,
        ))
    }

    async fn cancel_task(&self, caller: &Caller, arguments: Value) -> Answer {
        let args: TaskIdArgs = parse(tools::CANCEL_TASK, arguments)?;
        Ok(task_answer(self.tasks.cancel(caller, args.task_id).await))
    }

    async fn list_tasks(&self, caller: &Caller, arguments: Value) -> Answer {
        let args: ListTasksArgs = parse(tools::LIST_TASKS, arguments)?;
        // 0 (or none) is the server's default; more than MCP's page is cut.
        let page_size = args.page_size.map_or(0, |n| n.min(MAX_PAGE_SIZE));
        let message = ListTasksRequest {
            agent_id: args.agent_id,
            page_size: i32::try_from(page_size).unwrap_or(0),
            page_token: args.page_token.unwrap_or_default(),
        };
        Ok(match self.tasks.list(caller, message).await {
            Ok(page) => answer(&ListTasksOutput {
                tasks: page.tasks.iter().map(TaskView::of).collect(),
                next_page_token: Some(page.next_page_token).filter(|t| !t.is_empty()),
            }),
            Err(status) => refusal(&status, Retry::Plain),
        })
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
            tools::GET_TASK => self
                .get_task(&caller, arguments)
                .await
                .unwrap_or_else(|e| e),
            tools::WAIT_TASK => {
                // A client that gives up cancels the wait.
                tokio::select! {
                    result = self.wait_task(&caller, arguments) => result.unwrap_or_else(|e| e),
                    () = context.ct.cancelled() => {
                        return Err(ErrorData::internal_error("the call was cancelled", None));
                    }
                }
            }
            tools::CANCEL_TASK => self
                .cancel_task(&caller, arguments)
                .await
                .unwrap_or_else(|e| e),
            tools::LIST_TASKS => self
                .list_tasks(&caller, arguments)
                .await
                .unwrap_or_else(|e| e),
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
        tool_error(
            &message,
            "INVALID_ARGUMENTS",
            Code::InvalidArgument,
            None,
            false,
        )
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
            false,
        ),
    }
}

/// The result of a call that answers one task.
fn task_answer(result: Result<crate::proto::tasks_v1::Task, Status>) -> CallToolResult {
    match result {
        Ok(task) => answer(&TaskOutput {
            task: TaskView::of(&task),
        }),
        Err(status) => refusal(&status, Retry::Plain),
    }
}

/// What a call was keyed by, for the words of its refusal: a model must
/// be told to retry exactly as keeps it one task.
#[derive(Debug, Clone, Copy)]
pub(super) enum Retry<'a> {
    /// A create keyed by this key, from this source.
    Key(&'a str, KeySource),
    /// A create deduplicated by its fingerprint.
    Fingerprint,
    /// A call that changes nothing, or cancels: any retry is safe.
    Plain,
}

impl Retry<'_> {
    /// How to retry, as a clause.
    fn how(self) -> String {
        match self {
            Retry::Key(key, KeySource::Transport) => format!(
                "retry this same call with idempotency_key {key:?} (its Idempotency-Key header's \
                 key)"
            ),
            Retry::Key(key, _) => {
                format!("retry this same call with the same idempotency_key ({key:?})")
            }
            Retry::Fingerprint => "retry this same call with exactly the same arguments and \
                 no idempotency_key, within the server's dedup window (a new key would make a \
                 second task)"
                .to_owned(),
            Retry::Plain => "retry this same call".to_owned(),
        }
    }
}

/// The tool error for a call the service refused, in words for the model:
/// what happened and what to do.
pub(super) fn refusal(status: &Status, retry: Retry<'_>) -> CallToolResult {
    let reason = status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_else(|| code_name(status.code()));
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    let key = match retry {
        Retry::Key(_, KeySource::Transport) => "the Idempotency-Key header",
        _ => "idempotency_key",
    };
    let how = retry.how();
    let message = match reason.as_str() {
        "IDEMPOTENCY_KEY_REUSED" => format!(
            "conflict: {key} was already used with different arguments (agent_id, action or \
             parameters). To retry that earlier request, send exactly its arguments; for a new \
             request, use a new idempotency_key."
        ),
        "IDEMPOTENCY_REQUEST_IN_PROGRESS" => {
            format!("the first call with this key is still running; {how} in a second or two.")
        }
        "IDEMPOTENCY_KEY_INVALID" => format!("{key} is invalid: {}", status.message()),
        "DATABASE_UNAVAILABLE" => format!(
            "oncely's task store is unavailable right now; {how} in a few seconds: nothing is \
             done twice."
        ),
        _ => match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled => format!(
                "oncely could not be reached or answer ({}); {how} in a few seconds: nothing is \
                 done twice.",
                status.message()
            ),
            Code::DeadlineExceeded => format!(
                "{}; {how}: nothing is done twice.",
                status.message().trim_end_matches(['.', ';'])
            ),
            _ => status.message().to_owned(),
        },
    };
    let mut result = tool_error(
        &message,
        &reason,
        status.code(),
        retry_after,
        oncely_client::is_transient(status),
    );
    if let (Retry::Key(used, _), Some(error)) = (
        retry,
        result
            .structured_content
            .as_mut()
            .and_then(|content| content.get_mut("error"))
            .and_then(Value::as_object_mut),
    ) {
        error.insert("idempotency_key".to_owned(), json!(used));
    }
    result
}

/// A tool error: `message` for the model, and the same facts as JSON.
pub(super) fn tool_error(
    message: &str,
    reason: &str,
    code: Code,
    retry_after: Option<Duration>,
    retryable: bool,
) -> CallToolResult {
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

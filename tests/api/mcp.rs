//! MCP against the real binary, through rmcp's own client: streamable HTTP
//! at `/mcp` (MCP_ADDR) and stdio (`oncely mcp`, a child process calling
//! the server over gRPC). The same contract as every surface: one key, one
//! task; a retry marked replayed; a key reused with other arguments a tool
//! error; agent keys bound to their agents. (The Python `mcp` SDK drives
//! both transports too, in clients/python/tests/test_mcp.py.)

use std::{collections::HashMap, time::Duration};

use oncely::proto::tasks_v1::{
    CompleteTaskRequest, GetTaskRequest, worker_service_client::WorkerServiceClient,
};
use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, CallToolResult, ProtocolVersion, Tool},
    service::{ClientLifecycleMode, ClientServiceExt, RunningService},
    transport::{
        ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess,
        streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};

use crate::{
    auth::create_key,
    support::{
        BINARY, Backend, BinaryServer, PgProxy, TestApp, TestDb, eventually, keyed, lease_one,
        new_key,
    },
};

type Client = RunningService<RoleClient, ()>;

/// A session over streamable HTTP with `url`, with the legacy `initialize`
/// handshake (and `Mcp-Session-Id`), sending `token` as `Bearer` and
/// `headers` on every request.
async fn over_http(url: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Client {
    ().serve(http_transport(url, token, headers))
        .await
        .expect("an MCP session over HTTP")
}

/// The streamable HTTP client transport for [`over_http`].
fn http_transport(
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> StreamableHttpClientTransport<reqwest::Client> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(token) = token {
        config = config.auth_header(token.to_owned());
    }
    let headers: HashMap<_, _> = headers
        .iter()
        .map(|(name, value)| {
            (
                http::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                http::HeaderValue::from_str(value).expect("a header value"),
            )
        })
        .collect();
    StreamableHttpClientTransport::from_config(config.custom_headers(headers))
}

/// A session over stdio with `oncely mcp --server <grpc>`, with `token` in
/// `ONCELY_API_KEY` and `args` added.
async fn over_stdio(grpc: &str, token: Option<&str>, args: &[&str]) -> Client {
    let command = tokio::process::Command::new(BINARY).configure(|command| {
        command
            .args(["mcp", "--server", grpc])
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("ONCELY_API_KEY")
            .env_remove("ONCELY_SERVER");
        if let Some(token) = token {
            command.env("ONCELY_API_KEY", token);
        }
    });
    ().serve(TokioChildProcess::new(command).expect("spawn oncely mcp"))
        .await
        .expect("an MCP session over stdio")
}

/// Calls `tool` with `arguments` (a JSON object).
async fn call(client: &Client, tool: &'static str, arguments: Value) -> CallToolResult {
    let arguments = arguments.as_object().cloned().expect("an object");
    client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await
        .unwrap_or_else(|error| panic!("{tool} answered a protocol error: {error}"))
}

/// The structured answer of a call that succeeded.
#[track_caller]
fn ok(result: &CallToolResult) -> Value {
    assert_eq!(result.is_error, Some(false), "{result:?}");
    result
        .structured_content
        .clone()
        .expect("structured content")
}

/// The text and the structured error of a call that failed as a tool error.
#[track_caller]
fn tool_error(result: &CallToolResult) -> (String, Value) {
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let text = result
        .content
        .first()
        .and_then(|block| block.as_text())
        .map(|text| text.text.clone())
        .expect("a text");
    let error = result.structured_content.clone().expect("structured")["error"].clone();
    (text, error)
}

/// Leases the one queued task on the server at `grpc` and completes it
/// with `result`, as a worker would.
async fn complete_queued_task(grpc: &str, task_id: &str, result: Value) {
    let mut workers = WorkerServiceClient::connect(grpc.to_owned())
        .await
        .expect("a worker");
    let lease = lease_one(&mut workers).await;
    workers
        .complete_task(CompleteTaskRequest {
            task_id: task_id.to_owned(),
            lease_token: lease.lease_token,
            result: oncely_client::json::to_struct(result).ok(),
        })
        .await
        .expect("complete");
}

fn email(key: Option<&str>) -> Value {
    let mut arguments = json!({
        "agent_id": "agent-7",
        "action": "send_email",
        "parameters": {"to": "ada@example.com", "subject": "hello"},
    });
    if let Some(key) = key {
        arguments["idempotency_key"] = json!(key);
    }
    arguments
}

async fn a_retry_is_replayed_and_a_key_reused_for_another_request_a_conflict(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (server, url) = BinaryServer::start_with_mcp(&db, &[]).await;
    let client = over_http(&url, None, &[]).await;
    let key = new_key();

    let first = ok(&call(&client, "create_task", email(Some(&key))).await);
    let retry = ok(&call(&client, "create_task", email(Some(&key))).await);
    assert_eq!(first["replayed"], false);
    assert_eq!(retry["replayed"], true);
    assert_eq!(first["key_source"], "argument");
    assert_eq!(retry["idempotency_key"], key.as_str());
    assert_eq!(
        first["task"], retry["task"],
        "the first task, answered again"
    );
    assert_eq!(first["task"]["status"], "queued");
    let task_id = first["task"]["task_id"].as_str().expect("an id").to_owned();

    let mut other = email(Some(&key));
    other["parameters"]["subject"] = json!("goodbye");
    let (text, error) = tool_error(&call(&client, "create_task", other).await);
    assert!(text.starts_with("conflict:"), "{text}");
    assert_eq!(error["reason"], "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(error["retryable"], false);

    // One contract: the key retried over gRPC replays the same task, and
    // the agent has that one task.
    let grpc = TestApp::connect_to(server.addr());
    let again = grpc
        .tasks
        .clone()
        .create_task(keyed(
            Some(&key),
            oncely::proto::tasks_v1::CreateTaskRequest {
                agent_id: "agent-7".into(),
                action: "send_email".into(),
                parameters: oncely_client::json::to_struct(
                    json!({"subject": "hello", "to": "ada@example.com"}),
                )
                .ok(),
            },
        ))
        .await
        .expect("a replay over gRPC");
    assert_eq!(crate::support::replayed(&again), Some("true"));
    assert_eq!(again.into_inner().task_id, task_id);
    let listed = ok(&call(&client, "list_tasks", json!({"agent_id": "agent-7"})).await);
    assert_eq!(
        listed["tasks"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    client.cancel().await.expect("close the session");
}

conformance!(a_retry_is_replayed_and_a_key_reused_for_another_request_a_conflict);

/// A raw `initialize` POST to `url`, with `authorization` and `headers`.
async fn initialize(
    url: &str,
    authorization: Option<&str>,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body);
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("an answer")
}

/// A tool of `tools` by name.
#[track_caller]
fn tool<'a>(tools: &'a [Tool], name: &str) -> &'a Tool {
    tools
        .iter()
        .find(|tool| tool.name == name)
        .unwrap_or_else(|| panic!("no tool {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tools_have_schemas_a_model_can_fill_and_honest_annotations() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_server, url) = BinaryServer::start_with_mcp(&db, &[]).await;
    // The 2026 lifecycle: server/discover, no session.
    let client = ClientServiceExt::serve_with_lifecycle(
        (),
        http_transport(&url, None, &[]),
        ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        },
    )
    .await
    .expect("a stateless MCP client");
    let tools = client.list_all_tools().await.expect("tools/list");
    let mut names: Vec<_> = tools.iter().map(|tool| tool.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cancel_task",
            "create_task",
            "get_task",
            "list_tasks",
            "wait_task"
        ]
    );

    let create = tool(&tools, "create_task");
    let schema = Value::Object((*create.input_schema).clone());
    assert_eq!(
        schema["required"],
        json!(["agent_id", "action"]),
        "{schema}"
    );
    assert_eq!(schema["properties"]["parameters"]["type"], "object");
    let description = create.description.as_deref().unwrap_or_default();
    assert!(
        description.contains("SAME idempotency_key"),
        "{description}"
    );
    let hints = create.annotations.clone().expect("annotations");
    assert_eq!(hints.read_only_hint, Some(false));
    assert_eq!(hints.idempotent_hint, Some(false));
    let output = Value::Object((*create.output_schema.clone().expect("an output schema")).clone());
    // What a tasks/get result (which has the task only) must satisfy too.
    assert_eq!(output["required"], json!(["task"]), "{output}");
    for name in ["get_task", "wait_task", "list_tasks"] {
        let hints = tool(&tools, name).annotations.clone().expect("annotations");
        assert_eq!(hints.read_only_hint, Some(true), "{name}");
    }
    let cancel = tool(&tools, "cancel_task")
        .annotations
        .clone()
        .expect("annotations");
    assert_eq!(cancel.destructive_hint, Some(true));
    assert_eq!(cancel.idempotent_hint, Some(true));

    // And the tools work statelessly.
    let created = ok(&call(&client, "create_task", email(Some(&new_key()))).await);
    assert_eq!(created["replayed"], false);
    client.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_arguments_are_tool_errors_naming_the_field_and_store_nothing() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_server, url) = BinaryServer::start_with_mcp(&db, &[]).await;
    let client = over_http(&url, None, &[]).await;
    let cases = [
        ("create_task", json!({"action": "x"}), "agent_id"),
        (
            "create_task",
            json!({"agent_id": "a", "action": "x", "parameters": "nope"}),
            "parameters",
        ),
        (
            "create_task",
            json!({"agent_id": "a", "action": "x", "idempotencyKey": "k"}),
            "idempotencyKey",
        ),
        (
            "create_task",
            json!({"agent_id": "", "action": "x", "idempotency_key": "k"}),
            "agent_id",
        ),
        (
            "create_task",
            json!({"agent_id": "a", "action": "x", "idempotency_key": "k\u{e9}"}),
            "idempotency_key",
        ),
        (
            "wait_task",
            json!({"task_id": "0190b1a4-0000-4000-8000-000000000000", "timeout_seconds": 61}),
            "timeout_seconds",
        ),
        ("get_task", json!({"task_id": "not-a-uuid"}), "task_id"),
    ];
    for (name, arguments, field) in cases {
        let (text, error) = tool_error(&call(&client, name, arguments.clone()).await);
        assert!(text.contains(field), "{name} {arguments}: {text}");
        assert_eq!(error["code"], "INVALID_ARGUMENT", "{name} {arguments}");
    }
    db.assert_nothing_stored().await;
    // An unknown tool is the one protocol error.
    let unknown = client
        .call_tool(CallToolRequestParams::new("send_email"))
        .await;
    assert!(unknown.is_err(), "{unknown:?}");
    client.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_key_the_transport_key_or_the_fingerprint_deduplicates() {
    let db = TestDb::new(Backend::Postgres).await;
    // The server's policy rejects keyless gRPC calls; MCP asks for the
    // fingerprint rule by itself.
    let (server, url) = BinaryServer::start_with_mcp(&db, &[]).await;
    let client = over_http(&url, None, &[]).await;
    let first = ok(&call(&client, "create_task", email(None)).await);
    let again = ok(&call(&client, "create_task", email(None)).await);
    assert_eq!(first["key_source"], "fingerprint");
    assert!(first.get("idempotency_key").is_none(), "{first}");
    assert_eq!(
        (first["replayed"].clone(), again["replayed"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(first["task"]["task_id"], again["task"]["task_id"]);

    // An Idempotency-Key header on the HTTP request keys the call.
    let key = new_key();
    let keyed_client = over_http(&url, None, &[("idempotency-key", &key)]).await;
    let by_header = ok(&call(&keyed_client, "create_task", email(None)).await);
    assert_eq!(by_header["key_source"], "transport");
    assert_eq!(by_header["idempotency_key"], key.as_str());
    assert_eq!(by_header["replayed"], false);
    // The client's retry resends the header: the same task, replayed.
    let retried = ok(&call(&keyed_client, "create_task", email(None)).await);
    assert_eq!(retried["replayed"], true);
    assert_eq!(retried["task"]["task_id"], by_header["task"]["task_id"]);
    assert_ne!(by_header["task"]["task_id"], first["task"]["task_id"]);
    // The argument wins over the header.
    let own = new_key();
    let by_argument = ok(&call(&keyed_client, "create_task", email(Some(&own))).await);
    assert_eq!(by_argument["key_source"], "argument");
    assert_eq!(db.count("tasks").await, 3);

    // gRPC keeps its policy: a keyless call is still refused there.
    let grpc = TestApp::connect_to(server.addr());
    let refused = grpc
        .tasks
        .clone()
        .create_task(crate::support::email_request())
        .await
        .expect_err("keyless over gRPC");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    client.cancel().await.expect("close");
    keyed_client.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_stdio_a_task_is_created_once_waited_for_and_cancelled() {
    let db = TestDb::new(Backend::Postgres).await;
    let server = BinaryServer::start(&db).await;
    let grpc_url = server.url();
    let client = over_stdio(&grpc_url, None, &[]).await;
    let key = new_key();
    let first = ok(&call(&client, "create_task", email(Some(&key))).await);
    let retry = ok(&call(&client, "create_task", email(Some(&key))).await);
    assert_eq!(retry["replayed"], true);
    let task_id = first["task"]["task_id"].as_str().expect("an id").to_owned();
    assert_eq!(retry["task"]["task_id"], task_id.as_str());

    // A worker completes it while the model waits.
    let waiting = {
        let client_args = json!({"task_id": task_id, "timeout_seconds": 30});
        let peer = client.peer().clone();
        tokio::spawn(async move {
            peer.call_tool(
                CallToolRequestParams::new("wait_task")
                    .with_arguments(client_args.as_object().cloned().expect("object")),
            )
            .await
        })
    };
    complete_queued_task(&grpc_url, &task_id, json!({"message_id": "m-1"})).await;
    let waited = waiting.await.expect("join").expect("wait_task");
    let waited = ok(&waited);
    assert_eq!(waited["task"]["status"], "succeeded", "{waited}");
    assert_eq!(waited["task"]["finished"], true);
    assert_eq!(waited["task"]["result"], json!({"message_id": "m-1"}));

    // Cancelling a task no worker took.
    let other = ok(&call(&client, "create_task", email(Some(&new_key()))).await);
    let other_id = other["task"]["task_id"].clone();
    let cancelled = ok(&call(&client, "cancel_task", json!({"task_id": other_id})).await);
    assert_eq!(cancelled["task"]["status"], "cancelled");
    let read = ok(&call(&client, "get_task", json!({"task_id": other_id})).await);
    assert_eq!(read["task"]["status"], "cancelled");
    client.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_keys_are_bearer_tokens_and_bind_tasks_to_their_agent() {
    let db = TestDb::new(Backend::Postgres).await;
    let ada = create_key(&db, "ada", "agent", &[("--agent-id", "agent-7")]);
    let bob = create_key(&db, "bob", "agent", &[("--agent-id", "agent-9")]);
    let worker = create_key(&db, "mailer", "worker", &[]);
    let (server, url) = BinaryServer::start_with_mcp(&db, &[]).await;

    // No key, an unknown key, a worker's key: refused before any session.
    for token in [None, Some("not-a-key"), Some(worker.as_str())] {
        let refused = ().serve(http_transport(&url, token, &[])).await;
        assert!(refused.is_err(), "{token:?} was let in");
    }
    for (authorization, status) in [
        (None, 401),
        (Some("Bearer not-a-key".to_owned()), 401),
        (Some(format!("Bearer {worker}")), 403),
        // The scheme is case-blind, as HTTP's are.
        (Some(format!("bearer {ada}")), 200),
    ] {
        let answer = initialize(&url, authorization.as_deref(), &[]).await;
        assert_eq!(answer.status(), status, "{authorization:?}");
        if status == 401 {
            let challenge = answer.headers().get("www-authenticate");
            assert!(
                challenge.is_some_and(|v| v.to_str().unwrap_or_default().starts_with("Bearer")),
                "{:?}",
                answer.headers()
            );
        }
    }

    let as_ada = over_http(&url, Some(&ada), &[]).await;
    let as_bob = over_http(&url, Some(&bob), &[]).await;
    let mine = ok(&call(&as_ada, "create_task", email(Some(&new_key()))).await);
    let task_id = mine["task"]["task_id"].clone();
    let mut for_bob = email(Some(&new_key()));
    for_bob["agent_id"] = json!("agent-9");
    let (text, error) = tool_error(&call(&as_ada, "create_task", for_bob).await);
    assert_eq!(error["reason"], "PERMISSION_DENIED", "{text}");
    let (_, error) = tool_error(&call(&as_bob, "get_task", json!({"task_id": task_id})).await);
    assert!(
        ["PERMISSION_DENIED", "NOT_FOUND"].contains(&error["reason"].as_str().unwrap_or_default()),
        "{error}"
    );
    let (_, error) = tool_error(&call(&as_bob, "cancel_task", json!({"task_id": task_id})).await);
    assert_ne!(error["reason"], Value::Null);
    let still = ok(&call(&as_ada, "get_task", json!({"task_id": task_id})).await);
    assert_eq!(still["task"]["status"], "queued", "bob could not cancel it");

    // Over stdio, the bridge calls as ONCELY_API_KEY.
    let bridge = over_stdio(&server.url(), Some(&ada), &[]).await;
    let seen = ok(&call(&bridge, "get_task", json!({"task_id": task_id})).await);
    assert_eq!(seen["task"]["task_id"], task_id);
    let keyless_bridge = over_stdio(&server.url(), None, &[]).await;
    let (text, error) =
        tool_error(&call(&keyless_bridge, "get_task", json!({"task_id": task_id})).await);
    assert_eq!(error["reason"], "API_KEY_INVALID", "{text}");
    for client in [as_ada, as_bob, bridge, keyless_bridge] {
        client.cancel().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unavailable_store_or_server_is_a_tool_error_that_says_to_retry() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    let via_proxy = db.url_via(proxy.port);
    let (server, url) = BinaryServer::start_with_mcp(
        &db,
        &[
            ("DATABASE_URL", via_proxy.as_str()),
            ("DB_ACQUIRE_TIMEOUT", "1s"),
        ],
    )
    .await;
    let client = over_http(&url, None, &[]).await;
    let key = new_key();
    proxy.cut();
    let (text, error) = tool_error(&call(&client, "create_task", email(Some(&key))).await);
    assert!(
        text.contains(&format!("same idempotency_key ({key:?})")),
        "{text}"
    );
    assert_eq!(error["retryable"], true, "{error}");
    assert_eq!(error["idempotency_key"], key.as_str());
    // Keyless, the model is told to retry without a key: a key it made up
    // now would make a second task if the first had committed.
    let (text, _) = tool_error(&call(&client, "create_task", email(None)).await);
    assert!(text.contains("no idempotency_key"), "{text}");
    proxy.restore();
    // The retry the model is told to make creates the task, once.
    let created = eventually(
        Duration::from_secs(30),
        "the create to pass once the database is back",
        || async {
            let result = call(&client, "create_task", email(Some(&key))).await;
            (result.is_error == Some(false)).then(|| ok(&result))
        },
    )
    .await;
    assert_eq!(created["replayed"], false);
    let task_id = created["task"]["task_id"].as_str().expect("id").to_owned();
    let grpc = TestApp::connect_to(server.addr());
    let stored = grpc
        .tasks
        .clone()
        .get_task(GetTaskRequest { task_id })
        .await;
    assert!(stored.is_ok(), "{stored:?}");
    client.cancel().await.expect("close");

    // A bridge whose server is gone says so, after its attempts.
    drop(server);
    let orphan = over_stdio("http://127.0.0.1:9", None, &["--attempts", "2"]).await;
    let (text, error) = tool_error(&call(&orphan, "create_task", email(Some(&key))).await);
    assert!(text.contains("retry"), "{text}");
    assert_eq!(error["retryable"], true, "{error}");
    orphan.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_of_the_tasks_extension_polls_and_cancels_the_oncely_task() {
    use rmcp::model::{
        CallToolResponse, CancelTaskParams, ClientCapabilities, ClientConfig, GetTaskParams,
        Implementation, TaskPayload, TaskStatus,
    };

    let db = TestDb::new(Backend::Postgres).await;
    let (server, url) = BinaryServer::start_with_mcp(&db, &[]).await;
    let info = ClientConfig::new(
        ClientCapabilities::builder().enable_tasks().build(),
        Implementation::new("oncely-tests", "1"),
    );
    let client = info
        .serve(http_transport(&url, None, &[]))
        .await
        .expect("a session declaring tasks");
    let key = new_key();
    let create = |key: String| {
        let arguments = email(Some(&key)).as_object().cloned().expect("object");
        client.call_tool_once(CallToolRequestParams::new("create_task").with_arguments(arguments))
    };
    let CallToolResponse::Task(first) = create(key.clone()).await.expect("create") else {
        panic!("no task handle");
    };
    assert_eq!(first.task.status, TaskStatus::Working);
    assert!(first.task.poll_interval_ms.is_some());
    let CallToolResponse::Task(again) = create(key).await.expect("retry") else {
        panic!("no task handle");
    };
    assert_eq!(
        again.task.task_id, first.task.task_id,
        "one task for one key"
    );
    let replayed = again
        .meta
        .as_ref()
        .map(|meta| meta.0["io.oncely/replayed"].clone());
    assert_eq!(replayed, Some(json!(true)));

    // The handle is the oncely task: a worker completes it, and tasks/get
    // shows the result.
    let task_id = first.task.task_id.clone();
    let polled = client
        .get_task(GetTaskParams::new(task_id.clone()))
        .await
        .expect("tasks/get");
    assert_eq!(polled.task.task.status, TaskStatus::Working);
    complete_queued_task(&server.url(), &task_id, json!({"message_id": "m-2"})).await;
    let done = client
        .get_task(GetTaskParams::new(task_id))
        .await
        .expect("tasks/get");
    let TaskPayload::Completed { result } = &done.task.payload else {
        panic!("not completed: {done:?}");
    };
    assert_eq!(
        result["structuredContent"]["task"]["result"],
        json!({"message_id": "m-2"}),
        "{result:?}"
    );

    // tasks/cancel cancels the oncely task.
    let CallToolResponse::Task(other) = create(new_key()).await.expect("create") else {
        panic!("no task handle");
    };
    client
        .cancel_task(CancelTaskParams::new(other.task.task_id.clone()))
        .await
        .expect("tasks/cancel");
    let cancelled = client
        .get_task(GetTaskParams::new(other.task.task_id.clone()))
        .await
        .expect("tasks/get");
    assert_eq!(cancelled.task.task.status, TaskStatus::Cancelled);
    let grpc = TestApp::connect_to(server.addr());
    let stored = grpc.task(&other.task.task_id).await;
    assert_eq!(
        stored.status,
        oncely::proto::tasks_v1::TaskStatus::Cancelled as i32
    );
    let unknown = client
        .get_task(GetTaskParams::new("0190b1a4-0000-4000-8000-000000000000"))
        .await;
    assert!(unknown.is_err(), "{unknown:?}");
    client.cancel().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_and_origins_other_than_the_servers_are_refused() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_server, url) = BinaryServer::start_with_mcp(&db, &[]).await;
    let port = url
        .trim_end_matches("/mcp")
        .rsplit(':')
        .next()
        .expect("a port")
        .to_owned();
    // A page of another site whose name now points here (DNS rebinding).
    let rebound = format!("evil.example:{port}");
    let answer = initialize(&url, None, &[("host", &rebound)]).await;
    assert_eq!(answer.status(), 403);
    let origin = format!("http://{rebound}");
    let answer = initialize(&url, None, &[("origin", &origin)]).await;
    assert_eq!(answer.status(), 403);
    assert_eq!(initialize(&url, None, &[]).await.status(), 200);

    // A name the operator lists is answered.
    let (_listed, listed_url) =
        BinaryServer::start_with_mcp(&db, &[("MCP_ALLOWED_HOSTS", "oncely.internal")]).await;
    let port = listed_url
        .trim_end_matches("/mcp")
        .rsplit(':')
        .next()
        .expect("a port")
        .to_owned();
    let host = format!("oncely.internal:{port}");
    let answer = initialize(&listed_url, None, &[("host", &host)]).await;
    assert_eq!(answer.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_in_flight_at_shutdown_is_answered_before_the_listener_closes() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut command = std::process::Command::new(BINARY);
    command
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .env("MCP_ADDR", "127.0.0.1:0")
        .env("SHUTDOWN_GRACE", "30s");
    let (mut server, metrics) = BinaryServer::spawn_with_metrics(command).await;
    let url = server.mcp_url().await;
    let client = over_http(&url, None, &[]).await;
    let created = ok(&call(&client, "create_task", email(Some(&new_key()))).await);
    let arguments = json!({"task_id": created["task"]["task_id"], "timeout_seconds": 60});
    let peer = client.peer().clone();
    let waiting = tokio::spawn(async move {
        peer.call_tool(
            CallToolRequestParams::new("wait_task")
                .with_arguments(arguments.as_object().cloned().expect("object")),
        )
        .await
    });
    crate::support::started(
        &format!("http://{metrics}/metrics"),
        "tasks.v1.TaskService",
        "WaitTask",
        1,
    )
    .await;
    server.terminate();
    // Cut at shutdown, the call would get no answer at all.
    let answered = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the wait was answered, not cut off at shutdown")
        .expect("join")
        .expect("an answer");
    let answered = ok(&answered);
    assert_eq!(answered["task"]["finished"], false, "{answered}");
    assert!(server.wait_for_exit(Duration::from_secs(60)).success());
}

//! Logs and traces of the real binary: JSON log lines that carry each
//! call's request id and trace id, and spans exported over OTLP to a
//! receiver inside the test, parented by the caller's `traceparent`.

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use oncely::proto::tasks_v1::task_service_client::TaskServiceClient;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::Span,
};
use tonic::transport::Endpoint;

use crate::support::{
    BINARY, Backend, BinaryServer, TestDb, email_request, eventually, keyed, new_key,
};

/// A caller's trace context: a random trace id and span id.
struct Caller {
    trace_id: String,
    span_id: String,
}

impl Caller {
    fn new() -> Self {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let id = uuid::Uuid::new_v4();
        let span = uuid::Uuid::new_v4();
        Self {
            trace_id: hex(id.as_bytes()),
            span_id: hex(&span.as_bytes()[..8]),
        }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

/// One CreateTask with `caller`'s `traceparent`.
async fn create_traced(server: &BinaryServer, caller: &Caller) {
    let channel = Endpoint::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut request = keyed(Some(&new_key()), email_request());
    request
        .metadata_mut()
        .insert("traceparent", caller.traceparent().parse().expect("ASCII"));
    TaskServiceClient::new(channel)
        .create_task(request)
        .await
        .expect("create");
}

/// The binary on `db`, logging JSON at info level (the test keeps its
/// log).
async fn start_logging_json(db: &TestDb) -> BinaryServer {
    let mut command = Command::new(BINARY);
    command
        .env("DATABASE_URL", &db.url)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info");
    BinaryServer::spawn(command).await
}

async fn json_log_lines_carry_the_request_id_and_the_trace_id(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut server = start_logging_json(&db).await;
    let caller = Caller::new();

    create_traced(&server, &caller).await;
    server.terminate();
    server.wait_for_exit(Duration::from_secs(20));

    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    let done = lines
        .iter()
        .find(|l| l["message"] == "done" && l["outcome"].is_null())
        .unwrap_or_else(|| panic!("no line for the call: {log}"));
    let request_span = &done["spans"][0];
    assert_eq!(request_span["name"], "request", "{done}");
    let request_id = request_span["request_id"].as_str().expect("a request id");
    assert!(uuid::Uuid::parse_str(request_id).is_ok(), "{request_id}");
    assert_eq!(request_span["trace_id"], caller.trace_id.as_str(), "{done}");
    assert_eq!(request_span["rpc.method"], "CreateTask", "{done}");
    // Every line of the call carries them, and no request body is logged.
    for line in lines.iter().filter(|l| l["spans"].is_array()) {
        assert_eq!(line["spans"][0]["request_id"], request_id, "{line}");
    }
    assert!(!log.contains("ada@example.com"), "{log}");
}

/// The Rust client sends the caller's current trace context (feature
/// `opentelemetry`): the server's lines for the call carry its trace id.
async fn the_rust_client_carries_the_callers_trace_context(backend: Backend) {
    use opentelemetry::trace::{
        FutureExt, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    let db = TestDb::new(backend).await;
    let mut server = start_logging_json(&db).await;
    let caller = Caller::new();
    let span = SpanContext::new(
        TraceId::from_hex(&caller.trace_id).expect("trace id"),
        SpanId::from_hex(&caller.span_id).expect("span id"),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let client = oncely_client::OncelyClient::connect(server.url()).expect("client");

    client
        .create_task(email_request())
        .with_context(opentelemetry::Context::current().with_remote_span_context(span))
        .await
        .expect("create");
    server.terminate();
    server.wait_for_exit(Duration::from_secs(20));

    let log = server.log();
    let call = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "done")
        .unwrap_or_else(|| panic!("no line for the call: {log}"));
    assert_eq!(
        call["spans"][0]["trace_id"],
        caller.trace_id.as_str(),
        "{call}"
    );
}

/// Spans as an OTLP collector receives them, with their service's name.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| string_attribute(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|AnyValue { value }| value.as_ref())
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attribute(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Whether `span` is one of the store's (its code lives in oncely::storage).
fn in_storage(span: &Span) -> bool {
    span.attributes.iter().any(|kv| {
        kv.key.starts_with("code.")
            && matches!(
                kv.value.as_ref().and_then(|v| v.value.as_ref()),
                Some(any_value::Value::StringValue(s)) if s.starts_with("oncely::storage")
            )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn spans_reach_an_otlp_collector_under_the_callers_trace(backend: Backend) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let db = TestDb::new(backend).await;
    let mut command = Command::new(BINARY);
    command
        .env("DATABASE_URL", &db.url)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_SERVICE_NAME", "oncely-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info");
    let server = BinaryServer::spawn(command).await;
    let caller = Caller::new();

    create_traced(&server, &caller).await;

    let spans = eventually(Duration::from_secs(20), "the call's spans", || async {
        let spans = receiver.spans.lock().expect("lock").clone();
        let ours: Vec<_> = spans
            .into_iter()
            .filter(|(_, span)| hex(&span.trace_id) == caller.trace_id)
            .collect();
        // The call's span ends last (when its answer is sent), maybe in a
        // later export than its children.
        let has = |name: &str| ours.iter().any(|(_, s)| s.name == name);
        (has("CreateTask")
            && has("tasks.v1.TaskService/CreateTask")
            && ours.iter().any(|(_, s)| in_storage(s)))
        .then_some(ours)
    })
    .await;
    let (service, rpc) = spans
        .iter()
        .find(|(_, s)| s.name == "tasks.v1.TaskService/CreateTask")
        .unwrap_or_else(|| panic!("no span of the call: {spans:?}"));
    assert_eq!(service, "oncely-test");
    assert_eq!(hex(&rpc.parent_span_id), caller.span_id, "{rpc:?}");
    assert_eq!(
        attribute(&rpc.attributes, "rpc.grpc.status_code"),
        Some(&any_value::Value::IntValue(0)),
        "{rpc:?}"
    );
    assert_eq!(
        string_attribute(&rpc.attributes, "rpc.method").as_deref(),
        Some("CreateTask")
    );
    let (_, handler) = spans
        .iter()
        .find(|(_, s)| s.name == "CreateTask")
        .expect("the handler's span");
    assert_eq!(handler.parent_span_id, rpc.span_id);
    assert_eq!(
        string_attribute(&handler.attributes, "outcome").as_deref(),
        Some("created")
    );
    // The database's work has spans of its own in the same trace.
    assert!(
        spans.iter().any(|(_, s)| in_storage(s)),
        "no database span: {spans:?}"
    );
}

conformance!(
    json_log_lines_carry_the_request_id_and_the_trace_id,
    the_rust_client_carries_the_callers_trace_context,
    spans_reach_an_otlp_collector_under_the_callers_trace,
);

//! Server reflection, as grpcurl uses it: list services, describe methods.

use crate::support::Backend;

use prost::Message;
use prost_types::FileDescriptorProto;
use tonic_reflection::pb::{v1, v1alpha};

use crate::support::{CREATE_TASK_PATH, TestApp, TestDb, new_key};

const EXPECTED: &[&str] = &[
    "grpc.health.v1.Health",
    "tasks.v1.Admin",
    "tasks.v1.TaskService",
];

/// Asks a reflection service of `$version` (`v1` or `v1alpha`, whose
/// messages have the same shape) for the list of services and then for
/// `$second`; answers the service names and the file descriptors sent for
/// `$second`.
macro_rules! list_and_ask {
    ($version:ident, $app:expr, $second:expr) => {{
        use $version::{
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut client =
            $version::server_reflection_client::ServerReflectionClient::new($app.channel.clone());
        let ask = |message: MessageRequest| $version::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([
                ask(MessageRequest::ListServices(String::new())),
                ask($second),
            ]))
            .await
            .expect("reflection")
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = responses
            .message()
            .await
            .expect("stream")
            .expect("list")
            .message_response
        else {
            panic!("expected a service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        let Some(MessageResponse::FileDescriptorResponse(files)) = responses
            .message()
            .await
            .expect("stream")
            .expect("file")
            .message_response
        else {
            panic!("expected file descriptors");
        };
        let files: Vec<FileDescriptorProto> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).expect("descriptor"))
            .collect();
        (names, files)
    }};
}

#[track_caller]
fn assert_lists(names: &[String], expected: &[&str]) {
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
}

async fn reflection_v1_lists_the_services_and_describes_create_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    let (names, files) = list_and_ask!(
        v1,
        app,
        MessageRequest::FileContainingSymbol("tasks.v1.TaskService".into())
    );

    assert_lists(&names, EXPECTED);
    assert_lists(&names, &["grpc.reflection.v1.ServerReflection"]);
    let service = files
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "TaskService")
        .expect("TaskService described");
    let create = service
        .method
        .iter()
        .find(|m| m.name() == "CreateTask")
        .expect("CreateTask");
    assert_eq!(create.input_type(), ".tasks.v1.CreateTaskRequest");
    assert_eq!(create.output_type(), ".tasks.v1.Task");
}

async fn reflection_v1alpha_lists_the_services_and_serves_imported_files(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    // grpcurl needs the imports to describe CreateTaskRequest.parameters.
    let (names, files) = list_and_ask!(
        v1alpha,
        app,
        MessageRequest::FileByFilename("google/protobuf/struct.proto".into())
    );

    assert_lists(&names, EXPECTED);
    assert_eq!(files[0].name(), "google/protobuf/struct.proto");
}

/// What grpcurl does without proto files: discover the method by reflection,
/// build the request from JSON, call it, and print the answer as JSON.
async fn a_reflection_client_calls_create_task_from_json(backend: Backend) {
    use prost_reflect::{DescriptorPool, DynamicMessage};
    use v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    // Like grpcurl: the file that holds the service, then each import the
    // server has not sent yet, by name.
    let mut files: Vec<FileDescriptorProto> = Vec::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(
        "tasks.v1.TaskService".into(),
    )];
    while let Some(ask) = wanted.pop() {
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(ask),
            }]))
            .await
            .expect("reflection")
            .into_inner();
        let Some(MessageResponse::FileDescriptorResponse(found)) = responses
            .message()
            .await
            .expect("stream")
            .expect("files")
            .message_response
        else {
            panic!("expected file descriptors");
        };
        for bytes in &found.file_descriptor_proto {
            let file = FileDescriptorProto::decode(bytes.as_slice()).expect("descriptor");
            if files.iter().all(|f| f.name() != file.name()) {
                files.push(file);
            }
        }
        for dependency in files.iter().flat_map(|f| &f.dependency) {
            if files.iter().all(|f| f.name() != dependency) {
                wanted.push(MessageRequest::FileByFilename(dependency.clone()));
            }
        }
    }
    // Dependencies first, as a descriptor pool wants them.
    files.sort_by_key(|f| !f.name().starts_with("google/"));
    let pool =
        DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet { file: files })
            .expect("a complete set of descriptors");
    let method = pool
        .get_service_by_name("tasks.v1.TaskService")
        .expect("service")
        .methods()
        .find(|m| m.name() == "CreateTask")
        .expect("method");

    let json = r#"{"agent_id": "agent-7", "action": "send_email", "parameters": {"to": "ada@example.com", "n": 2}}"#;
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let request =
        DynamicMessage::deserialize(method.input(), &mut deserializer).expect("JSON request");
    let response = app
        .raw_call(CREATE_TASK_PATH, Some(&new_key()), request.encode_to_vec())
        .await
        .expect("call");
    let task =
        DynamicMessage::decode(method.output(), response.get_ref().as_slice()).expect("response");
    let answer = serde_json::to_value(&task).expect("JSON answer");

    assert_eq!(answer["agentId"], "agent-7");
    assert_eq!(answer["status"], "TASK_STATUS_QUEUED");
    assert_eq!(
        answer["parameters"],
        serde_json::json!({"to": "ada@example.com", "n": 2.0})
    );
    assert!(uuid::Uuid::parse_str(answer["taskId"].as_str().expect("taskId")).is_ok());
    assert_eq!(db.count("tasks").await, 1);
}

conformance!(
    a_reflection_client_calls_create_task_from_json,
    reflection_v1_lists_the_services_and_describes_create_task,
    reflection_v1alpha_lists_the_services_and_serves_imported_files,
);

//! Server reflection, as grpcurl uses it: list services, describe methods.

use crate::helpers::Backend;

use prost::Message;
use prost_types::FileDescriptorProto;
use tonic_reflection::pb::{v1, v1alpha};

use crate::helpers::{TestApp, TestDb};

const EXPECTED: &[&str] = &[
    "grpc.health.v1.Health",
    "tasks.v1.Admin",
    "tasks.v1.TaskService",
];

async fn reflection_v1_lists_the_services_and_describes_create_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    use v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let ask = |message: MessageRequest| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };

    let mut responses = client
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "tasks.v1.TaskService".into(),
            )),
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
    for name in EXPECTED
        .iter()
        .chain(&["grpc.reflection.v1.ServerReflection"])
    {
        assert!(
            names.contains(&name.to_string()),
            "{name} missing from {names:?}"
        );
    }
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
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    use v1alpha::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let ask = |message: MessageRequest| v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };

    let mut responses = client
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            // grpcurl needs the imports to describe CreateTaskRequest.parameters.
            ask(MessageRequest::FileByFilename(
                "google/protobuf/struct.proto".into(),
            )),
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
    for name in EXPECTED {
        assert!(
            names.contains(&name.to_string()),
            "{name} missing from {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) = responses
        .message()
        .await
        .expect("stream")
        .expect("file")
        .message_response
    else {
        panic!("expected struct.proto");
    };
    let file =
        FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice()).expect("descriptor");
    assert_eq!(file.name(), "google/protobuf/struct.proto");
}

conformance!(
    reflection_v1_lists_the_services_and_describes_create_task,
    reflection_v1alpha_lists_the_services_and_serves_imported_files,
);

//! The OpenAPI 3.1 document of the JSON API, served at
//! `/v1/openapi.json`: made once, from the same route table and the same
//! descriptors that transcode the calls, so that it cannot drift from the
//! protos (the schemas are the messages, by the proto3 JSON mapping, with
//! the protos' own comments as descriptions).

use std::collections::BTreeMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::{Map, Value, json};

use super::{ROUTES, Route, transcode::POOL};

/// The document's path.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

/// The document, as JSON text.
pub(super) fn document() -> String {
    let mut schemas = BTreeMap::new();
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for route in ROUTES {
        let operation = operation(&route, &mut schemas);
        paths
            .entry(route.pattern.to_owned())
            .or_default()
            .insert(route.http_method.to_ascii_lowercase(), operation);
    }
    schemas.insert("Problem".to_owned(), problem_schema());
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "oncely",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Tasks created exactly once for agents that retry: the JSON \
                form of tasks.v1.TaskService, on the gRPC port. Send a new \
                Idempotency-Key (a UUID v4) with each logical CreateTask and the same \
                key on every retry of it.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                    "description": "An API key made with `oncely keys create`, on servers with keys."},
            },
        },
        "security": [{}, {"bearer": []}],
    })
    .to_string()
}

/// One route's operation: its parameters, its body, its answers.
fn operation(route: &Route, schemas: &mut BTreeMap<String, Value>) -> Value {
    let rpc = POOL.as_ref().and_then(|pool| {
        pool.get_service_by_name(route.rpc.service().name())?
            .methods()
            .find(|m| m.name() == route.rpc.name())
    });
    let mut operation = Map::new();
    operation.insert("operationId".into(), json!(route.rpc.name()));
    let mut parameters = Vec::new();
    if let Some(rpc) = &rpc {
        if let Some(text) = comment(rpc.parent_file().file_descriptor_proto(), rpc.path()) {
            operation.insert("description".into(), json!(text));
        }
        let input = rpc.input();
        if route.pattern.contains("{task_id}") {
            parameters.push(json!({
                "name": "task_id", "in": "path", "required": true,
                "schema": {"type": "string", "format": "uuid"},
            }));
        }
        for name in route.query {
            if let Some(field) = input.get_field_by_name(name) {
                let mut parameter = json!({
                    "name": name, "in": "query", "required": false,
                    "schema": field_schema(&field, schemas),
                });
                if let Some(text) =
                    comment(field.parent_file().file_descriptor_proto(), field.path())
                {
                    parameter["description"] = json!(text);
                }
                parameters.push(parameter);
            }
        }
        if route.body {
            operation.insert(
                "requestBody".into(),
                json!({
                    "required": true,
                    "content": {"application/json": {"schema": message_ref(&input, schemas)}},
                }),
            );
        }
    }
    if route.rpc == super::super::rpc::Method::CreateTask {
        parameters.push(json!({
            "name": "Idempotency-Key", "in": "header", "required": true,
            "description": "A key generated once per logical call (a UUID v4) and sent on \
                every retry of it; may be quoted, as a structured-field string. Optional \
                only on servers with MISSING_KEY_POLICY=fingerprint.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }));
    }
    if !parameters.is_empty() {
        operation.insert("parameters".into(), Value::Array(parameters));
    }
    let success = match &rpc {
        Some(rpc) => json!({
            "description": "The answer.",
            "headers": success_headers(route),
            "content": {"application/json": {"schema": message_ref(&rpc.output(), schemas)}},
        }),
        None => json!({"description": "The answer."}),
    };
    let code = if route.body { "201" } else { "200" };
    let mut responses = Map::new();
    responses.insert(code.into(), success);
    responses.insert(
        "default".into(),
        json!({
            "description": "A refusal, as a problem (RFC 9457) carrying the gRPC reason.",
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }),
    );
    operation.insert("responses".into(), Value::Object(responses));
    Value::Object(operation)
}

/// The headers of a route's successful answer.
fn success_headers(route: &Route) -> Value {
    if !route.body {
        return json!({});
    }
    json!({
        "Idempotent-Replayed": {
            "description": "true when the answer is the first request's, replayed.",
            "schema": {"type": "string", "enum": ["true", "false"]},
        },
        "Idempotency-Key-Source": {
            "description": "header, or fingerprint for a keyless request deduplicated by its fingerprint.",
            "schema": {"type": "string", "enum": ["header", "fingerprint"]},
        },
        "Location": {"description": "The task's URL.", "schema": {"type": "string"}},
    })
}

/// A reference to `message`'s schema, which is added to `schemas` (with
/// the messages it holds) if it is not there yet.
fn message_ref(message: &MessageDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    if let Some(schema) = well_known(message.full_name()) {
        return schema;
    }
    let name = message.name().to_owned();
    if !schemas.contains_key(&name) {
        // Placed first, so that a message that holds itself ends.
        schemas.insert(name.clone(), Value::Null);
        let mut properties = Map::new();
        for field in message.fields() {
            let mut schema = field_schema(&field, schemas);
            if let Some(text) = comment(field.parent_file().file_descriptor_proto(), field.path()) {
                // JSON Schema 2020-12 lets a description stand beside a $ref.
                schema["description"] = json!(text);
            }
            properties.insert(field.json_name().to_owned(), schema);
        }
        let mut schema = json!({"type": "object", "properties": properties});
        if let Some(text) = comment(
            message.parent_file().file_descriptor_proto(),
            message.path(),
        ) {
            schema["description"] = json!(text);
        }
        schemas.insert(name.clone(), schema);
    }
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// A field's schema, by the proto3 JSON mapping.
fn field_schema(field: &FieldDescriptor, schemas: &mut BTreeMap<String, Value>) -> Value {
    let single = match field.kind() {
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Kind::Uint32 | Kind::Fixed32 => json!({"type": "integer", "format": "int64", "minimum": 0}),
        // 64-bit integers are strings in proto3 JSON.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Enum(enumeration) => {
            let names: Vec<String> = enumeration.values().map(|v| v.name().to_owned()).collect();
            json!({"type": "string", "enum": names})
        }
        Kind::Message(message) => message_ref(&message, schemas),
    };
    if field.is_list() {
        json!({"type": "array", "items": single})
    } else {
        single
    }
}

/// The JSON form of the well-known types the API uses.
fn well_known(full_name: &str) -> Option<Value> {
    Some(match full_name {
        "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({
            "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
            "description": "Seconds, with an `s`: `30s`, `1.5s`.",
        }),
        _ => return None,
    })
}

/// The schema of a problem.
fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "A refusal (RFC 9457), with the reason the gRPC ErrorInfo carries.",
        "properties": {
            "type": {"type": "string", "description": "urn:oncely:problem:<reason>, or about:blank."},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string", "description": "What to fix, for a person."},
            "reason": {"type": "string", "description": "The stable reason code, as over gRPC."},
            "domain": {"type": "string"},
            "grpc_code": {"type": "string"},
            "errors": {"type": "array", "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "detail": {"type": "string"}},
            }},
            "retry_after_seconds": {"type": "integer"},
        },
        "required": ["type", "title", "status", "detail"],
    })
}

/// The comment above the element at `path` in `file`, trimmed.
fn comment(file: &FileDescriptorProto, path: &[i32]) -> Option<String> {
    let location = file
        .source_code_info
        .as_ref()?
        .location
        .iter()
        .find(|location| location.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let joined = lines.join(" ").trim().to_owned();
    (!joined.is_empty()).then_some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_document_with_its_messages() {
        let document: Value = serde_json::from_str(&document()).unwrap();
        for route in ROUTES {
            let method = route.http_method.to_ascii_lowercase();
            assert!(
                document["paths"][route.pattern][&method].is_object(),
                "{} {}",
                route.http_method,
                route.pattern
            );
        }
        let schemas = &document["components"]["schemas"];
        let task = &schemas["Task"]["properties"];
        assert_eq!(task["taskId"]["type"], "string");
        assert_eq!(task["createTime"]["format"], "date-time", "{task}");
        assert_eq!(task["status"]["enum"][1], "TASK_STATUS_QUEUED", "{task}");
        assert!(schemas["CreateTaskRequest"]["properties"]["agentId"].is_object());
        assert!(schemas["ListTasksResponse"].is_object());
    }

    #[test]
    fn every_query_parameter_is_a_field_of_its_request() {
        let pool = POOL.as_ref().expect("the descriptors");
        for route in ROUTES {
            let input = pool
                .get_service_by_name(route.rpc.service().name())
                .and_then(|s| s.methods().find(|m| m.name() == route.rpc.name()))
                .map(|m| m.input())
                .expect("the route's RPC");
            for name in route.query {
                assert!(
                    input.get_field_by_name(name).is_some(),
                    "{} has no field {name}",
                    input.full_name()
                );
            }
        }
    }
}

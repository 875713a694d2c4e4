//! JSON to protobuf and back, by the canonical proto3 JSON mapping of the
//! API's own descriptors (the ones reflection serves): the protos are the
//! one source of truth for both surfaces.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Value};
use tonic::Status;
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use super::{super::ERROR_DOMAIN, Route};
use crate::proto::FILE_DESCRIPTOR_SET;

/// The API's descriptors, read once.
pub(super) static POOL: LazyLock<Option<DescriptorPool>> =
    LazyLock::new(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).ok());

/// The request and answer messages of one route's RPC.
#[derive(Debug)]
pub(super) struct Transcoder {
    input: Option<MessageDescriptor>,
    output: Option<MessageDescriptor>,
}

impl Transcoder {
    /// The messages of `route`'s RPC.
    pub(super) fn for_route(route: &Route) -> Self {
        let method = POOL.as_ref().and_then(|pool| {
            pool.get_service_by_name(route.rpc.service().name())?
                .methods()
                .find(|m| m.name() == route.rpc.name())
        });
        Self {
            input: method.as_ref().map(|m| m.input()),
            output: method.as_ref().map(|m| m.output()),
        }
    }

    /// The RPC's request message, encoded: from the JSON `body` for a
    /// route that takes one, else from the path's `task_id` and the
    /// `query`. A body or a query that is not the message is refused with
    /// INVALID_ARGUMENT saying why.
    pub(super) fn request(
        &self,
        route: &Route,
        task_id: Option<String>,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<u8>, Status> {
        let input = self
            .input
            .clone()
            .ok_or_else(|| Status::internal("the API's descriptors are missing"))?;
        let message = if route.body {
            if query.is_some_and(|q| !q.is_empty()) {
                return Err(invalid("query", "this route takes no query parameters"));
            }
            from_json(input, body, "body")?
        } else {
            if !body.iter().all(u8::is_ascii_whitespace) {
                return Err(invalid(
                    "body",
                    "this route takes no body: its parameters go in the path and the query",
                ));
            }
            let fields = fields_of(route, task_id, query)?;
            from_json(input, Value::Object(fields).to_string().as_bytes(), "query")?
        };
        Ok(message)
    }

    /// The RPC's answer, `message` (encoded), as canonical JSON, with its
    /// `taskId` when it is a task (for `Location`): one decoding for both.
    pub(super) fn response(&self, message: &[u8]) -> Result<(Vec<u8>, Option<String>), Status> {
        let output = self
            .output
            .clone()
            .ok_or_else(|| Status::internal("the API's descriptors are missing"))?;
        let message = DynamicMessage::decode(output, message)
            .map_err(|e| Status::internal(format!("the service's answer does not decode: {e}")))?;
        let mut json = serde_json::to_value(&message)
            .map_err(|e| Status::internal(format!("the answer has no JSON form: {e}")))?;
        whole_numbers_as_integers(&mut json);
        let task_id = json["taskId"].as_str().map(str::to_owned);
        let text = serde_json::to_vec(&json)
            .map_err(|e| Status::internal(format!("the answer has no JSON form: {e}")))?;
        Ok((text, task_id))
    }
}

/// Writes every whole number that a double holds exactly as an integer
/// (`1`, not `1.0`): `parameters` and `result` hold doubles, and an agent
/// that sent `1` reads `1` back, as canonical JSON (and the gRPC clients'
/// conversions) write it.
fn whole_numbers_as_integers(value: &mut Value) {
    /// 2^53: every integer up to it is exactly a double.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) => {
            if let Some(float) = number
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
                && !number.is_i64()
                && !number.is_u64()
            {
                *value = Value::from(float as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// The JSON object a route's path and query stand for: `task_id` from the
/// path, and each query parameter the route takes, by its field's name.
fn fields_of(
    route: &Route,
    task_id: Option<String>,
    query: Option<&str>,
) -> Result<Map<String, Value>, Status> {
    let mut fields = Map::new();
    if let Some(task_id) = task_id {
        fields.insert("task_id".into(), Value::String(task_id));
    }
    let pairs = form_urlencoded(query.unwrap_or_default())?;
    for (name, value) in pairs {
        if !route.query.contains(&name.as_str()) {
            let takes = if route.query.is_empty() {
                "none".to_owned()
            } else {
                route.query.join(", ")
            };
            return Err(invalid(
                &name,
                &format!("unknown query parameter; this route takes {takes}"),
            ));
        }
        if fields.insert(name.clone(), Value::String(value)).is_some() {
            return Err(invalid(&name, "given twice"));
        }
    }
    Ok(fields)
}

/// The pairs of a query string, percent-decoded.
fn form_urlencoded(query: &str) -> Result<Vec<(String, String)>, Status> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .map_err(|e| invalid("query", &format!("not a query string: {e}")))
}

/// `json` as a `descriptor` message, encoded, by the canonical proto3 JSON
/// mapping (field names as in the proto or in lowerCamelCase; unknown
/// fields refused).
///
/// `google.protobuf.Struct` fields (`parameters`) are encoded by prost
/// from the parsed JSON, a few words a value: a dynamic message would hold
/// a map for every value of a list, hundreds of bytes for two of JSON.
fn from_json(descriptor: MessageDescriptor, json: &[u8], what: &str) -> Result<Vec<u8>, Status> {
    let name = descriptor.name().to_owned();
    let not_the_message =
        |e: &dyn std::fmt::Display| invalid(what, &format!("not a {name} in JSON: {e}"));
    let mut value: Value = serde_json::from_slice(json).map_err(|e| not_the_message(&e))?;
    let mut structs = Vec::new();
    if let Value::Object(object) = &mut value {
        for field in descriptor.fields() {
            let is_struct = matches!(field.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.Struct");
            if !is_struct || field.is_list() {
                continue;
            }
            for key in [field.name(), field.json_name()] {
                if let Some(given) = object.remove(key) {
                    structs.push((field.number(), field.name().to_owned(), given));
                }
            }
        }
    }
    let message =
        DynamicMessage::deserialize(descriptor, value).map_err(|e| not_the_message(&e))?;
    let mut encoded = message.encode_to_vec();
    let mut seen = Vec::new();
    for (number, field, given) in structs {
        if seen.contains(&number) {
            return Err(invalid(&field, "given twice"));
        }
        seen.push(number);
        if given.is_null() {
            continue;
        }
        let object = oncely_client::json::to_struct(given)
            .map_err(|e| invalid(&field, &format!("must be a JSON object: {e}")))?;
        prost::encoding::message::encode(number, &object, &mut encoded);
    }
    Ok(encoded)
}

/// An INVALID_ARGUMENT refusal of `field`, as the gRPC surface's
/// refusals of a request read (reason `INVALID_REQUEST`).
fn invalid(field: &str, description: &str) -> Status {
    let mut details = ErrorDetails::with_error_info(
        "INVALID_REQUEST",
        ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    details.set_bad_request(vec![FieldViolation::new(field, description)]);
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {description}"),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::json::ROUTES;

    fn create() -> (Route, Transcoder) {
        let route = ROUTES[0];
        (route, Transcoder::for_route(&route))
    }

    #[test]
    fn a_body_in_either_spelling_is_the_same_message() {
        let (route, transcoder) = create();
        let [snake, camel] = [
            &br#"{"agent_id": "a", "action": "b", "parameters": {"x": 1}}"#[..],
            br#"{"agentId": "a", "action": "b", "parameters": {"x": 1}}"#,
        ]
        .map(|body| transcoder.request(&route, None, None, body).unwrap());
        assert_eq!(snake, camel);
    }

    #[test]
    fn bodies_that_are_not_the_message_are_invalid() {
        let (route, transcoder) = create();
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"agent": "a"}"#,
            br#"{"agent_id": 7}"#,
            br#"{"agent_id": "a"} trailing"#,
        ] {
            let status = transcoder.request(&route, None, None, body).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{body:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_a_stack_overflow() {
        let (route, transcoder) = create();
        let depth = 100_000;
        let body = format!(
            r#"{{"agent_id": "a", "action": "b", "parameters": {{"x": {}{}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let status = transcoder
            .request(&route, None, None, body.as_bytes())
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn whole_numbers_read_as_integers_and_fractions_stay() {
        let mut value = serde_json::json!({"a": 1.0, "b": [2.5, -3.0], "c": 1e300});
        whole_numbers_as_integers(&mut value);
        assert_eq!(value.to_string(), r#"{"a":1,"b":[2.5,-3],"c":1e+300}"#);
    }

    #[test]
    fn a_wide_list_in_parameters_is_encoded_compactly() {
        let (route, transcoder) = create();
        let zeros = vec!["0"; 100_000].join(",");
        let body =
            format!(r#"{{"agent_id": "a", "action": "b", "parameters": {{"x": [{zeros}]}}}}"#);
        let encoded = transcoder
            .request(&route, None, None, body.as_bytes())
            .unwrap();
        // A value of a list is a handful of protobuf bytes.
        assert!(encoded.len() < 100_000 * 12, "{}", encoded.len());
        let decoded =
            crate::proto::tasks_v1::CreateTaskRequest::decode(encoded.as_slice()).unwrap();
        assert_eq!(decoded.agent_id, "a");
    }

    #[test]
    fn path_and_query_fill_the_message() {
        let wait = ROUTES[3];
        let transcoder = Transcoder::for_route(&wait);
        assert!(
            transcoder
                .request(&wait, Some("abc".into()), Some("timeout=30s"), b"")
                .is_ok()
        );
        let unknown = transcoder
            .request(&wait, Some("abc".into()), Some("wait=30s"), b"")
            .unwrap_err();
        assert!(unknown.message().contains("takes timeout"), "{unknown:?}");
    }
}

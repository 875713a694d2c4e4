//! How a refusal reads over HTTP: the gRPC status every surface answers
//! with, as an HTTP status and an `application/problem+json` body (RFC
//! 9457) that carries the same reason code as the gRPC `ErrorInfo`, the
//! field violations, and the wait of `RetryInfo` as `Retry-After`.

use http::{HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::api::code_name;

/// The media type of a problem.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The reason of a key reused for another request: 422 over HTTP, as the
/// Idempotency-Key draft has it, where gRPC says FAILED_PRECONDITION.
const KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";
/// The reason of a request too large to take: 413 over HTTP.
const TOO_LARGE: &str = "REQUEST_TOO_LARGE";
/// The reason of a body that is not JSON: 415 over HTTP.
const NOT_JSON: &str = "UNSUPPORTED_MEDIA_TYPE";

/// The HTTP status a gRPC status is answered with.
pub(super) fn http_status(code: Code, reason: Option<&str>) -> StatusCode {
    match (code, reason) {
        (Code::FailedPrecondition, Some(KEY_REUSED)) => StatusCode::UNPROCESSABLE_ENTITY,
        (Code::ResourceExhausted, Some(TOO_LARGE)) => StatusCode::PAYLOAD_TOO_LARGE,
        (Code::InvalidArgument, Some(NOT_JSON)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        (Code::Ok, _) => StatusCode::OK,
        (Code::InvalidArgument | Code::OutOfRange, _) => StatusCode::BAD_REQUEST,
        (Code::Unauthenticated, _) => StatusCode::UNAUTHORIZED,
        (Code::PermissionDenied, _) => StatusCode::FORBIDDEN,
        (Code::NotFound, _) => StatusCode::NOT_FOUND,
        (Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition, _) => StatusCode::CONFLICT,
        (Code::ResourceExhausted, _) => StatusCode::TOO_MANY_REQUESTS,
        (Code::Unavailable, _) => StatusCode::SERVICE_UNAVAILABLE,
        (Code::DeadlineExceeded, _) => StatusCode::GATEWAY_TIMEOUT,
        (Code::Unimplemented, _) => StatusCode::NOT_IMPLEMENTED,
        (Code::Cancelled, _) => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        (Code::Unknown | Code::Internal | Code::DataLoss, _) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `status` as an HTTP response: its HTTP status, `Retry-After` when it
/// says when to retry, and the problem.
pub(super) fn response(status: &Status) -> http::Response<String> {
    let reason = status.get_details_error_info().map(|info| info.reason);
    response_as(status, http_status(status.code(), reason.as_deref()))
}

/// [`response`] with the HTTP status `code`, for refusals only HTTP has
/// (a method a route does not take).
pub(super) fn response_as(status: &Status, code: StatusCode) -> http::Response<String> {
    let info = status.get_details_error_info();
    let reason = info.as_ref().map(|info| info.reason.as_str());
    let mut problem = Map::new();
    problem.insert("type".into(), Value::String(problem_type(reason)));
    problem.insert(
        "title".into(),
        Value::String(code.canonical_reason().unwrap_or("Error").to_owned()),
    );
    problem.insert("status".into(), json!(code.as_u16()));
    problem.insert("detail".into(), Value::String(status.message().to_owned()));
    problem.insert("grpc_code".into(), Value::String(code_name(status.code())));
    if let Some(info) = &info {
        problem.insert("reason".into(), Value::String(info.reason.clone()));
        problem.insert("domain".into(), Value::String(info.domain.clone()));
    }
    if let Some(bad) = status.get_details_bad_request() {
        let errors: Vec<Value> = bad
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "detail": v.description}))
            .collect();
        problem.insert("errors".into(), Value::Array(errors));
    }
    let retry_after = status
        .get_details_retry_info()
        .and_then(|retry| retry.retry_delay)
        // Whole seconds, at least one: what Retry-After can say.
        .map(|delay| delay.as_secs() + u64::from(delay.subsec_nanos() > 0))
        .map(|seconds| seconds.max(1));
    if let Some(seconds) = retry_after {
        problem.insert("retry_after_seconds".into(), json!(seconds));
    }
    let mut response = http::Response::new(Value::Object(problem).to_string());
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if code == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// A problem's type: a URN naming the reason, so that a client can tell
/// problems apart without parsing the detail; `about:blank` without one.
fn problem_type(reason: Option<&str>) -> String {
    reason.map_or_else(
        || "about:blank".to_owned(),
        |reason| format!("urn:oncely:problem:{reason}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_key_is_unprocessable_and_a_request_in_flight_a_conflict() {
        assert_eq!(
            http_status(Code::FailedPrecondition, Some(KEY_REUSED)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            http_status(Code::Aborted, Some("IDEMPOTENCY_REQUEST_IN_PROGRESS")),
            StatusCode::CONFLICT
        );
        assert_eq!(
            http_status(Code::ResourceExhausted, Some("RATE_LIMITED")),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::ResourceExhausted, Some(TOO_LARGE)),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}

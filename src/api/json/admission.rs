//! What the JSON API refuses before a call's body is read, and so before
//! any gate: a content type that is not JSON, a browser's request from a
//! page of another origin, a body declared larger than the bound.

use http::{HeaderMap, header};
use tonic::{Code, Status, body::Body};
use tonic_types::StatusExt;

use super::super::ERROR_DOMAIN;

/// The reason of a request whose body is not JSON: 415.
const UNSUPPORTED_MEDIA_TYPE: &str = "UNSUPPORTED_MEDIA_TYPE";

/// What refuses a JSON call before its body is read: a content type that
/// is not JSON (so that a web page cannot send a form, which needs no
/// consent from the server, as a call), a browser's request from a page of
/// another origin, a body declared larger than the bound.
pub(super) fn refuse_before_reading(
    request: &http::Request<Body>,
    max_body_bytes: usize,
) -> Option<Status> {
    let headers = request.headers();
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let content_type = content_type.to_str().unwrap_or("?");
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Some(Status::with_error_details(
                Code::InvalidArgument,
                format!(
                    "the body is JSON: send Content-Type: application/json (or none), not {:?}",
                    echo(content_type)
                ),
                tonic_types::ErrorDetails::with_error_info(
                    UNSUPPORTED_MEDIA_TYPE,
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                ),
            ));
        }
    }
    if let Some(origin) = cross_origin(headers, request.uri()) {
        return Some(Status::permission_denied(format!(
            "the JSON API does not serve web pages of other origins ({:?}); call it from \
             the agent's own process",
            echo(&origin)
        )));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max_body_bytes as u64) {
        return Some(too_large(max_body_bytes));
    }
    None
}

/// The `Origin` of a browser's request from a page of another origin than
/// the server's (`Host`): a web page the user visits must not be able to
/// create or cancel tasks on a server it can reach.
pub(crate) fn cross_origin(headers: &HeaderMap, uri: &http::Uri) -> Option<String> {
    let origin = headers.get(header::ORIGIN)?.to_str().unwrap_or("?");
    // HTTP/2 carries the host in the URI's authority, not in `Host`.
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| uri.authority().map(http::uri::Authority::as_str))
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    (!origin_host.eq_ignore_ascii_case(host)).then(|| origin.to_owned())
}

/// At most a short prefix of caller input, for a message.
fn echo(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The refusal of a body past the bound, as the gRPC surface words it.
pub(super) fn too_large(max_body_bytes: usize) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("the request's body is larger than {max_body_bytes} bytes; send a smaller one"),
        tonic_types::ErrorDetails::with_error_info(
            "REQUEST_TOO_LARGE",
            ERROR_DOMAIN,
            std::collections::HashMap::new(),
        ),
    )
}

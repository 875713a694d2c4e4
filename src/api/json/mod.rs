//! The JSON API: HTTP/1.1 or HTTP/2 with JSON bodies, on the gRPC port,
//! for agents that cannot speak gRPC (curl, fetch, tool runtimes).
//!
//! A request that is not gRPC (its content type is not
//! `application/grpc...`) is transcoded, as a gRPC gateway does: its
//! route names the RPC (`routes.rs`), its JSON body (or path and query)
//! becomes the RPC's request message by the canonical proto3 JSON mapping
//! of the same protos (`transcode.rs`), and the call then goes through the
//! very gates and services a gRPC call does: the same API keys, limits,
//! metrics, logs, and one idempotency contract with one fingerprint, so a
//! key first used over gRPC and retried over HTTP replays. The answer's
//! message is rendered as JSON, and a refusal as a problem (`problem.rs`).
//! gRPC requests pass through untouched.
//!
//! `Idempotency-Key` is the metadata `idempotency-key` (HTTP header names
//! are case-blind); its value may be quoted, as a structured-field string,
//! as the IETF draft writes it.

mod admission;
mod lazy_body;
mod openapi;
mod problem;
mod routes;
mod transcode;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

pub(crate) use admission::cross_origin;
pub use openapi::OPENAPI_PATH;
pub use problem::PROBLEM_JSON;
pub use routes::{ROUTES, Route};

use admission::{refuse_before_reading, too_large};
use lazy_body::LazyBody;
use routes::Matched;
use transcode::Transcoder;

/// The header that says a CreateTask answer was replayed.
const REPLAYED: &str = "idempotent-replayed";
/// The header that says which key a CreateTask was deduplicated by.
const KEY_SOURCE: &str = "idempotency-key-source";
/// The idempotency key header.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Serves the JSON API in front of the gRPC services; see the module.
#[derive(Debug, Clone)]
pub struct JsonApi {
    /// The largest JSON body taken, in bytes.
    max_body_bytes: usize,
}

impl JsonApi {
    /// A JSON API taking bodies of at most `max_body_bytes`.
    pub fn new(max_body_bytes: usize) -> Self {
        Self { max_body_bytes }
    }
}

impl<S> Layer<S> for JsonApi {
    type Service = JsonGateway<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JsonGateway {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

/// The service [`JsonApi`] makes of the gRPC services.
#[derive(Debug, Clone)]
pub struct JsonGateway<S> {
    inner: S,
    max_body_bytes: usize,
}

impl<S> Service<http::Request<Body>> for JsonGateway<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if is_grpc(request.headers()) {
            return Box::pin(self.inner.call(request));
        }
        // The ready service answers this call; a clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(transcoded(inner, request, self.max_body_bytes))
    }
}

/// The service and method a JSON call is transcoded to, for its span; `None`
/// for a gRPC call or a path the JSON API does not have.
pub fn rpc_names<B>(request: &http::Request<B>) -> Option<(&'static str, &'static str)> {
    if is_grpc(request.headers()) {
        return None;
    }
    match routes::find(request.method().as_str(), request.uri().path()) {
        Matched::Route(route, _) => Some((route.rpc.service().name(), route.rpc.name())),
        _ => None,
    }
}

/// Whether a request is gRPC's, which passes through.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// Answers an HTTP request through the gRPC service `inner`.
async fn transcoded<S>(
    mut inner: S,
    request: http::Request<Body>,
    max_body_bytes: usize,
) -> Result<http::Response<Body>, S::Error>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    if request.method() == http::Method::GET && request.uri().path() == OPENAPI_PATH {
        return Ok(openapi_document());
    }
    let (route, task_id) = match routes::find(request.method().as_str(), request.uri().path()) {
        Matched::Route(route, task_id) => (route, task_id),
        Matched::WrongMethod(allowed) => {
            let status = Status::new(
                Code::Unimplemented,
                format!(
                    "{} takes {}, not {}",
                    request.uri().path(),
                    allowed.join(" or "),
                    request.method()
                ),
            );
            let mut response = problem::response_as(&status, StatusCode::METHOD_NOT_ALLOWED)
                .map(|text| Body::new(Full::new(Bytes::from(text))));
            if let Ok(allow) = HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            return Ok(response);
        }
        Matched::NoRoute => {
            return Ok(refusal(&Status::not_found(format!(
                "no route {}: the JSON API has POST /v1/tasks, GET /v1/tasks, \
                 GET /v1/tasks/{{task_id}}, POST /v1/tasks/{{task_id}}:wait and \
                 POST /v1/tasks/{{task_id}}:cancel",
                request.uri().path()
            ))));
        }
    };
    if let Some(refused) = refuse_before_reading(&request, max_body_bytes) {
        return Ok(refusal(&refused));
    }
    let transcoder = Arc::new(Transcoder::for_route(&route));
    let (mut parts, body) = request.into_parts();
    let query = parts.uri.query().map(str::to_owned);
    parts.uri = match http::Uri::try_from(route_path(&route)) {
        Ok(uri) => uri,
        Err(error) => return Ok(refusal(&Status::internal(error.to_string()))),
    };
    parts.method = http::Method::POST;
    grpc_headers(&mut parts.headers);
    // The JSON is read and turned into the message only when the service
    // reads its request, after every gate let the call in: a caller the
    // gates refuse costs no parsing.
    let message = {
        let transcoder = Arc::clone(&transcoder);
        async move {
            let json = match Limited::new(body, max_body_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                    return Err(too_large(max_body_bytes));
                }
                Err(error) => {
                    return Err(Status::invalid_argument(format!(
                        "the request's body could not be read: {error}"
                    )));
                }
            };
            let message = transcoder.request(&route, task_id, query.as_deref(), &json)?;
            Ok(grpc_frame(&message))
        }
    };
    let call = http::Request::from_parts(parts, Body::new(LazyBody::new(message)));
    let answer = inner.call(call).await?;
    Ok(answered(&route, &transcoder, answer).await)
}

/// The OpenAPI document, made once.
fn openapi_document() -> http::Response<Body> {
    static DOCUMENT: std::sync::LazyLock<Bytes> =
        std::sync::LazyLock::new(|| Bytes::from(openapi::document()));
    let mut response = http::Response::new(Body::new(Full::new(DOCUMENT.clone())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The gRPC path of a route's RPC.
fn route_path(route: &Route) -> String {
    format!("/{}/{}", route.rpc.service().name(), route.rpc.name())
}

/// Turns an HTTP request's headers into a gRPC call's: the content type,
/// `te`, no length (the body changed), and the idempotency key unquoted.
fn grpc_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_ENCODING);
    headers.remove("grpc-encoding");
    unquote_idempotency_key(headers);
}

/// The `Idempotency-Key` header without the quotes the IETF draft writes
/// it in (a structured-field string); the quotes are not part of the key.
pub(crate) fn unquote_idempotency_key(headers: &mut HeaderMap) {
    // A single key only: several are refused by the gate, as over gRPC.
    let single = headers.get_all(IDEMPOTENCY_KEY).iter().count() == 1;
    let unquoted = headers
        .get(IDEMPOTENCY_KEY)
        .filter(|_| single)
        .and_then(|key| key.to_str().ok())
        .and_then(|key| key.strip_prefix('"')?.strip_suffix('"'))
        .and_then(|key| HeaderValue::from_str(key).ok());
    if let Some(key) = unquoted {
        headers.insert(IDEMPOTENCY_KEY, key);
    }
}

/// `message` as one uncompressed gRPC frame.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

/// The HTTP answer to a gRPC answer: its message as JSON, or its status
/// as a problem.
async fn answered(
    route: &Route,
    transcoder: &Transcoder,
    answer: http::Response<Body>,
) -> http::Response<Body> {
    let (parts, mut body) = answer.into_parts();
    let mut data = Vec::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => {
                    if let Ok(more) = frame.into_trailers() {
                        trailers.extend(more);
                    }
                }
            },
            Err(status) => return refusal(&status),
        }
    }
    let status = Status::from_header_map(&parts.headers)
        .or_else(|| Status::from_header_map(&trailers))
        .unwrap_or_else(|| Status::internal("the service answered without a status"));
    if status.code() != Code::Ok {
        return refusal(&status);
    }
    let Some(message) = one_message(&data) else {
        return refusal(&Status::internal(
            "the service's answer is not one uncompressed message",
        ));
    };
    let (json, task_id) = match transcoder.response(message) {
        Ok(answer) => answer,
        Err(status) => return refusal(&status),
    };
    let mut response = http::Response::new(Body::new(Full::new(Bytes::from(json))));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for name in [REPLAYED, KEY_SOURCE] {
        if let Some(value) = parts.headers.get(name) {
            headers.insert(name, value.clone());
        }
    }
    if route.rpc == super::rpc::Method::CreateTask {
        // Created, the first time and on every replay of it alike.
        *response.status_mut() = StatusCode::CREATED;
        if let Some(location) =
            task_id.and_then(|id| HeaderValue::from_str(&format!("/v1/tasks/{id}")).ok())
        {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    // What the call holds (its places among the calls, its connection's
    // count) is held until the JSON is sent, as a gRPC answer holds it.
    super::gate::hold_until_sent(response, body)
}

/// The message of a gRPC answer's one uncompressed frame.
fn one_message(data: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = data.split_first()?;
    let (length, message) = rest.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_be_bytes(*length)).ok()?;
    (compressed == 0 && message.len() == length).then_some(message)
}

/// A refusal as an HTTP answer.
fn refusal(status: &Status) -> http::Response<Body> {
    problem::response(status).map(|text| Body::new(Full::new(Bytes::from(text))))
}

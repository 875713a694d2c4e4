//! `/mcp`: MCP over streamable HTTP (rmcp's service), behind a door that
//! answers the HTTP questions before any JSON-RPC is read: a browser page
//! of another origin is refused, and, while the server requires API keys,
//! a request without a valid agent key gets `401` with
//! `WWW-Authenticate: Bearer`, as MCP's authorization rules ask. Every tool
//! call is then made as that key through the server's own gates, which
//! check it again (a key revoked since counts at once).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use serde_json::json;
use tokio_stream::StreamExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{calls::Tasks, handler::OncelyMcp};
use crate::{
    api::{ApiKeyGate, ConnectionInfo, ServiceError},
    auth::AuthError,
    domain::Role,
};

/// The path MCP is served at.
pub const MCP_PATH: &str = "/mcp";

/// What `/mcp` needs besides the services.
#[derive(Debug, Clone)]
pub struct McpHttpSettings {
    /// The Host header values answered besides loopback's; `*` for any.
    pub allowed_hosts: Vec<String>,
    /// The largest request body taken, in bytes.
    pub max_body_bytes: usize,
}

/// The router serving `/mcp` with `tasks`, keys checked by `keys` (the
/// gate every call passes); each POST is tracked by `in_flight` until its
/// answer has been sent, so that shutdown can let the calls in flight
/// answer before `shutdown`, cancelled, ends the sessions and streams.
pub fn router(
    tasks: Tasks,
    keys: ApiKeyGate,
    settings: &McpHttpSettings,
    local: SocketAddr,
    in_flight: TaskTracker,
    shutdown: CancellationToken,
) -> axum::Router {
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown)
        .with_max_request_body_bytes(settings.max_body_bytes);
    config = if settings.allowed_hosts.iter().any(|host| host == "*") {
        config.disable_allowed_hosts()
    } else {
        config.with_allowed_hosts(allowed_hosts(&settings.allowed_hosts, local))
    };
    let service = StreamableHttpService::new(
        move || Ok(OncelyMcp::new(tasks.clone(), Default::default())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    axum::Router::new().route_service(MCP_PATH, service).layer(
        axum::middleware::from_fn_with_state(Arc::new(Door { keys, in_flight }), admit),
    )
}

/// The Host values answered: loopback's, the listener's own address, and
/// the configured ones.
fn allowed_hosts(configured: &[String], local: SocketAddr) -> Vec<String> {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !local.ip().is_unspecified() {
        hosts.push(local.ip().to_string());
    }
    hosts.extend(
        configured
            .iter()
            .map(|host| host.trim().to_owned())
            .filter(|host| !host.is_empty()),
    );
    hosts
}

/// What the door checks calls with, and counts them in.
#[derive(Debug)]
struct Door {
    keys: ApiKeyGate,
    in_flight: TaskTracker,
}

/// The door: origin and API key; see the module. A POST let in holds a
/// token of `in_flight` until its answer's body has been sent (or dropped).
async fn admit(State(door): State<Arc<Door>>, request: Request, next: Next) -> Response {
    if let Some(origin) = crate::api::json::cross_origin(request.headers(), request.uri()) {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "oncely's MCP server does not serve web pages of other origins ({origin:?}); \
                 connect from the agent's own process"
            ),
        );
    }
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<ConnectionInfo>>()
        .and_then(|info| info.0.peer())
        .map(|peer| peer.ip());
    let refused = match door
        .keys
        .admit_http(request.headers(), peer, "MCP", &[Role::Agent])
    {
        Ok(_) if request.method() == http::Method::POST => {
            let token = door.in_flight.token();
            let (parts, body) = next.run(request).await.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                // Held by the body, dropped with it.
                let _ = &token;
                chunk
            });
            return Response::from_parts(parts, axum::body::Body::from_stream(body));
        }
        Ok(_) => return next.run(request).await,
        Err(refused) => refused,
    };
    match refused {
        ServiceError::Unauthenticated(error) => {
            let message = match error {
                AuthError::Missing => "this server requires an API key: send the header \
                     `Authorization: Bearer <token>` with an agent key (an operator creates one \
                     with `oncely keys create --role agent`)"
                    .to_owned(),
                other => other.to_string(),
            };
            let mut response = refuse(StatusCode::UNAUTHORIZED, &message);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"oncely\""),
            );
            response
        }
        ServiceError::RateLimited(wait) => {
            let mut response = refuse(StatusCode::TOO_MANY_REQUESTS, &refused.to_string());
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        ServiceError::PermissionDenied(message) => refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "{message}: MCP takes agent keys (`oncely keys create --name NAME --role agent \
                 --agent-id AGENT_ID`)"
            ),
        ),
        other => refuse(StatusCode::INTERNAL_SERVER_ERROR, &other.to_string()),
    }
}

/// A refusal before any JSON-RPC was read: the HTTP status, with a JSON-RPC
/// error body (id null) that MCP clients show their user.
fn refuse(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": { "code": -32001, "message": message },
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

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
use tokio_util::sync::CancellationToken;

use super::{calls::Tasks, handler::OncelyMcp};
use crate::{
    auth::{AuthError, KeyRing},
    domain::{Principal, Role},
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

/// The router serving `/mcp` with `tasks`, keys checked against `ring`;
/// sessions and streams end when `shutdown` is cancelled.
pub fn router(
    tasks: Tasks,
    ring: KeyRing,
    settings: &McpHttpSettings,
    local: SocketAddr,
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
    axum::Router::new()
        .route_service(MCP_PATH, service)
        .layer(axum::middleware::from_fn_with_state(Arc::new(ring), admit))
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

/// The door: origin and API key; see the module.
async fn admit(State(ring): State<Arc<KeyRing>>, request: Request, next: Next) -> Response {
    if let Some(origin) = crate::api::json::cross_origin(request.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "oncely's MCP server does not serve web pages of other origins ({origin:?}); \
                 connect from the agent's own process"
            ),
        );
    }
    if ring.required() {
        let token = crate::api::bearer(request.headers());
        match ring.authenticate(token) {
            Err(error) => {
                let message = match error {
                    AuthError::Missing => "this server requires an API key: send the header \
                         `Authorization: Bearer <token>` with an agent key (an operator creates \
                         one with `oncely keys create --role agent`)"
                        .to_owned(),
                    other => other.to_string(),
                };
                let mut response = refuse(StatusCode::UNAUTHORIZED, &message);
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"oncely\""),
                );
                return response;
            }
            Ok(Principal { role, name, .. }) if role != Role::Agent => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "the key {name:?} has the {role} role; MCP takes agent keys (`oncely \
                         keys create --name NAME --role agent --agent-id AGENT_ID`)"
                    ),
                );
            }
            Ok(_) => {}
        }
    }
    next.run(request).await
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

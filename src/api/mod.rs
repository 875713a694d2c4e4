//! The gRPC surface: the services, the `idempotency-key` layer, the one
//! mapping of errors to `Status`, and the one place where an RPC's outcome
//! is logged and its response metadata attached.

mod admin_service;
mod auth_layer;
mod connection;
mod deadline;
mod error;
mod key_layer;
mod metrics_layer;
mod oversize;
mod rate_layer;
mod reply;
mod task_service;
mod worker_service;

pub use admin_service::AdminApi;
pub use auth_layer::{RequireApiKey, RequireApiKeyLayer};
pub use connection::{ConnectionInfo, ConnectionLayer, ConnectionLimits, GuardedIo, TrackCalls};
pub use error::{ERROR_DOMAIN, IN_PROGRESS_RETRY_DELAY, ServiceError};
pub use key_layer::{RequireIdempotencyKey, RequireIdempotencyKeyLayer};
pub use metrics_layer::{RpcMetrics, RpcMetricsLayer};
pub use oncely_client::metadata::{IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_SOURCE, IDEMPOTENT_REPLAYED};
pub use oversize::{RewriteOversize, RewriteOversizeLayer};
pub use rate_layer::{RateLimit, RateLimitLayer, RateLimits};
pub use task_service::TaskApi;
pub use worker_service::WorkerApi;

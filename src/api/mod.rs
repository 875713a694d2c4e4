//! The gRPC surface: the services, the gates every call passes through
//! (`stack.rs` orders them), the one mapping of errors to `Status`, and the
//! one place where an RPC's outcome is logged and its response metadata
//! attached.
//!
//! - `rpc.rs`: the RPC a call is for, parsed once from its path.
//! - `gate.rs`: the one tower service that runs a gate; `stack.rs`: the
//!   gates in order: `rpc_metrics.rs`, `connection/`, `oversize.rs`,
//!   `api_key_gate.rs`, `rate_gate.rs`, `idempotency_key_gate.rs`.
//! - `task_service.rs`, `worker_service.rs`, `admin_service.rs`: the
//!   services; `deadline.rs`: how long a long poll may wait.
//! - `error.rs`: errors to `Status`; `reply.rs`: how every RPC ends.
//! - `json/`: the JSON API, transcoded into the same RPCs in front of the
//!   gates.

mod admin_service;
mod api_key_gate;
mod connection;
mod deadline;
mod error;
mod gate;
mod idempotency_key_gate;
pub mod json;
mod oversize;
mod rate_gate;
mod reply;
mod rpc;
mod rpc_metrics;
mod stack;
mod task_service;
mod worker_service;

pub use admin_service::AdminApi;
pub use api_key_gate::ApiKeyGate;
pub use connection::{CallGuard, ConnectionInfo, ConnectionLimits, GuardedIo, TrackCalls};
pub use error::{ERROR_DOMAIN, IN_PROGRESS_RETRY_DELAY, ServiceError, code_name};
pub use gate::{Gate, Gated};
pub use idempotency_key_gate::IdempotencyKeyGate;
pub(crate) use idempotency_key_gate::key_from_headers;
pub use oncely_client::metadata::{IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_SOURCE, IDEMPOTENT_REPLAYED};
pub use oversize::RewriteOversize;
pub use rate_gate::{Places, RateGate, RateLimits};
pub use rpc::{Method, Rpc, Service, Streaming, asked};
pub use rpc_metrics::{Call, RpcMetrics};
pub use stack::{CallStack, Stacked};
pub use task_service::TaskApi;
pub use worker_service::WorkerApi;

//! The gRPC surface: the services, the `idempotency-key` layer, and the
//! mapping of errors to `Status`.

mod admin_service;
mod error;
mod key_layer;
mod task_service;

pub use admin_service::AdminApi;
pub use error::{ERROR_DOMAIN, IN_PROGRESS_RETRY_DELAY, ServiceError, chain};
pub use key_layer::{IDEMPOTENCY_KEY_HEADER, RequireIdempotencyKey, RequireIdempotencyKeyLayer};
pub use task_service::{KEY_SOURCE_HEADER, REPLAYED_HEADER, TaskApi};

use chrono::{DateTime, Utc};

/// A database timestamp as a protobuf `Timestamp`.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // Always below 10^9 for a DateTime, so the cast cannot truncate.
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

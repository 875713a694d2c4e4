//! `tasks.v1.Admin`.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{ServiceError, task_service::finish};
use crate::{
    domain::FieldViolation,
    idempotency::{CREATE_TASK_SCOPE, KEYLESS_CREATE_TASK_SCOPE, KeyPolicy},
    proto::tasks_v1::{CleanupRequest, CleanupResponse, admin_server::Admin},
    storage::Store,
};

/// The longest `older_than` accepted: 100 years.
const MAX_OLDER_THAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The Admin implementation.
#[derive(Debug, Clone)]
pub struct AdminApi<S> {
    store: S,
    policy: KeyPolicy,
    batch_size: i64,
}

impl<S: Store> AdminApi<S> {
    /// Cleanup deletes in batches of `batch_size`; an unset `older_than`
    /// means the policy's retention.
    pub fn new(store: S, policy: KeyPolicy, batch_size: i64) -> Self {
        Self {
            store,
            policy,
            batch_size: batch_size.max(1),
        }
    }

    async fn cleanup(&self, request: CleanupRequest) -> Result<CleanupResponse, ServiceError> {
        let older_than = match request.older_than {
            None => self.policy.retention,
            Some(d) => duration(d)?,
        };
        let retention = self.policy.retention;
        if older_than < retention {
            // A live record is what makes a retry safe; deleting one would let
            // the next retry with its key run the side effect again.
            return Err(ServiceError::InvalidRequest(vec![FieldViolation {
                field: "older_than".into(),
                description: format!(
                    "older_than is {}, shorter than the retention of {}: records younger than the retention still protect retries; send at least the retention or leave older_than unset",
                    humantime::format_duration(older_than),
                    humantime::format_duration(retention)
                ),
            }]));
        }
        tracing::Span::current().record(
            "older_than",
            humantime::format_duration(older_than).to_string(),
        );
        // Keyed records go once past `older_than`; keyless ones once past
        // the dedup window, and never earlier, whatever the two durations.
        let keyed = self
            .store
            .delete_keys_older_than(CREATE_TASK_SCOPE, older_than, self.batch_size)
            .await?;
        let keyless = self
            .store
            .delete_keys_older_than(
                KEYLESS_CREATE_TASK_SCOPE,
                self.policy.dedup_window,
                self.batch_size,
            )
            .await?;
        let deleted = keyed + keyless;
        tracing::Span::current().record("deleted", deleted);
        Ok(CleanupResponse {
            deleted: i64::try_from(deleted).unwrap_or(i64::MAX),
        })
    }
}

fn duration(d: prost_types::Duration) -> Result<Duration, ServiceError> {
    let invalid = |description: String| {
        ServiceError::InvalidRequest(vec![FieldViolation {
            field: "older_than".into(),
            description,
        }])
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid(format!(
            "older_than is negative ({}s {}ns); send a positive duration or leave it unset for the retention",
            d.seconds, d.nanos
        )));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(invalid(format!(
            "older_than has {} nanos; at most 999999999 are allowed",
            d.nanos
        )));
    }
    // Whole microseconds: the database's resolution.
    let value = Duration::new(d.seconds as u64, (d.nanos as u32 / 1000) * 1000);
    if value > MAX_OLDER_THAN {
        return Err(invalid("older_than is longer than 100 years".into()));
    }
    Ok(value)
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminApi<S> {
    #[tracing::instrument(
        name = "Cleanup",
        skip_all,
        fields(rpc.method = "Cleanup", outcome, older_than, deleted)
    )]
    async fn cleanup(
        &self,
        request: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        let result = AdminApi::cleanup(self, request.into_inner()).await;
        if result.is_ok() {
            tracing::Span::current().record("outcome", "ok");
        }
        finish(result.map(Response::new))
    }
}

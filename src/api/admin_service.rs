//! `tasks.v1.Admin`.

use tonic::{Request, Response, Status};

use super::{
    ServiceError,
    reply::{Success, finish},
};
use crate::{
    domain::CleanupQuery,
    idempotency::{CREATE_TASK_SCOPE, KEYLESS_CREATE_TASK_SCOPE, KeyPolicy},
    metrics::metrics,
    proto::tasks_v1::{CleanupRequest, CleanupResponse, admin_server::Admin},
    storage::Store,
};

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

    async fn cleanup(
        &self,
        request: CleanupRequest,
    ) -> Result<Success<CleanupResponse>, ServiceError> {
        let query = CleanupQuery::parse(&request, self.policy.retention)
            .map_err(ServiceError::InvalidRequest)?;
        let span = tracing::Span::current();
        span.record(
            "older_than",
            humantime::format_duration(query.older_than).to_string(),
        );
        // Keyed records go once past `older_than`; keyless ones once past
        // the dedup window, and never earlier, whatever the two durations.
        let keyed = self
            .store
            .delete_keys_older_than(CREATE_TASK_SCOPE, query.older_than, self.batch_size)
            .await?;
        metrics().cleanup_deleted.inc_by(keyed);
        let keyless = self
            .store
            .delete_keys_older_than(
                KEYLESS_CREATE_TASK_SCOPE,
                self.policy.dedup_window,
                self.batch_size,
            )
            .await?;
        metrics().cleanup_deleted.inc_by(keyless);
        let deleted = keyed + keyless;
        span.record("deleted", deleted);
        Ok(Success::Ok(CleanupResponse {
            deleted: i64::try_from(deleted).unwrap_or(i64::MAX),
        }))
    }
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
        finish(AdminApi::cleanup(self, request.into_inner()).await, None)
    }
}

//! The worker's calls about one lease, each retried under the worker's
//! [`RetryPolicy`] with the lease's token and the worker's API key.

use std::time::Duration;

use prost_types::Struct;
use tonic::{Request, transport::Channel};

use super::TaskError;
use crate::{
    ClientError, RetryPolicy,
    auth::{ApiKey, authorize},
    proto::tasks_v1::{
        CompleteTaskRequest, FailTaskRequest, Lease, RenewLeaseRequest, Task,
        worker_service_client::WorkerServiceClient,
    },
    retry::{proto_duration, with_retries},
};

/// The worker's calls about one lease.
#[derive(Debug, Clone)]
pub(super) struct Calls {
    pub(super) client: WorkerServiceClient<Channel>,
    pub(super) policy: RetryPolicy,
    pub(super) lease_duration: Duration,
    pub(super) api_key: Option<ApiKey>,
}

impl Calls {
    /// A request for `message` with the API key and the deadline `timeout`.
    pub(super) fn request<T>(&self, message: T, timeout: Duration) -> Request<T> {
        let mut request = Request::new(message);
        authorize(&mut request, self.api_key.as_ref());
        crate::trace::propagate(&mut request);
        request.set_timeout(timeout);
        request
    }

    /// RenewLease, retried for at most `within` (the next heartbeat is due
    /// then).
    pub(super) async fn renew(
        &self,
        task_id: &str,
        token: &str,
        within: Duration,
    ) -> Result<Lease, ClientError> {
        let policy = RetryPolicy {
            total_timeout: self.policy.total_timeout.min(within),
            ..self.policy
        };
        let request = RenewLeaseRequest {
            task_id: task_id.to_owned(),
            lease_token: token.to_owned(),
            lease_duration: Some(proto_duration(self.lease_duration)),
        };
        let (response, _) = with_retries(
            &policy,
            "RenewLease",
            &self.client,
            |mut client, timeout| {
                let call = self.request(request.clone(), timeout);
                async move { client.renew_lease(call).await }
            },
        )
        .await?;
        Ok(response.into_inner())
    }

    /// CompleteTask, retried with the same token: the server answers a
    /// repeat of a completion that succeeded with the same task.
    pub(super) async fn complete(
        &self,
        task_id: &str,
        token: &str,
        result: Struct,
    ) -> Result<Task, ClientError> {
        let request = CompleteTaskRequest {
            task_id: task_id.to_owned(),
            lease_token: token.to_owned(),
            result: Some(result),
        };
        let (response, _) = with_retries(
            &self.policy,
            "CompleteTask",
            &self.client,
            |mut client, timeout| {
                let call = self.request(request.clone(), timeout);
                async move { client.complete_task(call).await }
            },
        )
        .await?;
        Ok(response.into_inner())
    }

    /// FailTask under `policy`.
    pub(super) async fn fail(
        &self,
        task_id: &str,
        token: &str,
        failure: &TaskError,
        policy: &RetryPolicy,
    ) -> Result<Task, ClientError> {
        let request = FailTaskRequest {
            task_id: task_id.to_owned(),
            lease_token: token.to_owned(),
            error_message: failure.message().to_owned(),
            permanent: failure.is_permanent(),
            retry_after: failure.retry_delay().map(proto_duration),
        };
        let (response, _) =
            with_retries(policy, "FailTask", &self.client, |mut client, timeout| {
                let call = self.request(request.clone(), timeout);
                async move { client.fail_task(call).await }
            })
            .await?;
        Ok(response.into_inner())
    }
}

//! `tasks.v1.WorkerService`.

use tonic::{Request, Response, Status};

use super::{
    ServiceError,
    deadline::bounded_wait,
    reply::{Done, finish},
};
use crate::{
    domain::{
        Completion, Failure, LeaseQuery, Limits, Renewal, TaskId, TaskRecord, timestamp,
        violation::echo_segment,
    },
    proto::tasks_v1::{
        CompleteTaskRequest, FailTaskRequest, Lease, LeaseTasksRequest, LeaseTasksResponse,
        RenewLeaseRequest, Task, worker_service_server::WorkerService,
    },
    queue::{self, QueuePolicy},
    storage::Store,
};

/// The WorkerService implementation.
#[derive(Debug, Clone)]
pub struct WorkerApi<S> {
    store: S,
    policy: QueuePolicy,
    limits: Limits,
}

impl<S: Store> WorkerApi<S> {
    /// A service over `store`: leases last `policy.default_lease` unless
    /// asked otherwise; results obey `limits` as parameters do.
    pub fn new(store: S, policy: QueuePolicy, limits: Limits) -> Self {
        Self {
            store,
            policy,
            limits,
        }
    }

    async fn lease(
        &self,
        request: Request<LeaseTasksRequest>,
    ) -> Result<Done<LeaseTasksResponse>, ServiceError> {
        let wait_cap = |wanted| bounded_wait(request.metadata(), wanted);
        let query = LeaseQuery::parse(request.get_ref().clone(), self.policy.default_lease)
            .map_err(ServiceError::InvalidRequest)?;
        let wait = wait_cap(query.wait);
        let span = tracing::Span::current();
        span.record("worker_id", echo_segment(&query.worker_id).as_str());
        let leased = queue::lease_tasks(&self.store, &query, &self.policy, wait).await?;
        span.record("leased", leased.len());
        Ok(Done::Ok(LeaseTasksResponse {
            leases: leased.iter().map(lease).collect(),
        }))
    }

    async fn renew(&self, request: RenewLeaseRequest) -> Result<Done<Lease>, ServiceError> {
        let renewal = Renewal::parse(&request, self.policy.default_lease)
            .map_err(ServiceError::InvalidRequest)?;
        let task_id = renewal.lease.task_id;
        record_task(task_id);
        let task = queue::renew_lease(&self.store, &renewal)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        Ok(Done::Ok(lease(&task)))
    }

    async fn complete(&self, request: CompleteTaskRequest) -> Result<Done<Task>, ServiceError> {
        let completion =
            Completion::parse(&request, &self.limits).map_err(ServiceError::InvalidRequest)?;
        let task_id = completion.lease.task_id;
        record_task(task_id);
        let task = queue::complete_task(&self.store, &completion)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        Ok(Done::Ok(task.to_task()))
    }

    async fn fail(&self, request: FailTaskRequest) -> Result<Done<Task>, ServiceError> {
        let failure = Failure::parse(&request).map_err(ServiceError::InvalidRequest)?;
        let task_id = failure.lease.task_id;
        record_task(task_id);
        let task = queue::fail_task(&self.store, &failure, &self.policy)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        tracing::Span::current().record("status", task.status);
        Ok(Done::Ok(task.to_task()))
    }
}

/// A leased task as its worker sees it.
fn lease(task: &TaskRecord) -> Lease {
    Lease {
        task: Some(task.to_task()),
        lease_token: task.lease_token.map(|t| t.to_string()).unwrap_or_default(),
        expire_time: Some(timestamp(task.available_at)),
    }
}

fn record_task(task_id: TaskId) {
    tracing::Span::current().record("task_id", tracing::field::display(task_id));
}

#[tonic::async_trait]
impl<S: Store> WorkerService for WorkerApi<S> {
    #[tracing::instrument(
        name = "LeaseTasks",
        skip_all,
        fields(rpc.method = "LeaseTasks", outcome, worker_id, leased)
    )]
    async fn lease_tasks(
        &self,
        request: Request<LeaseTasksRequest>,
    ) -> Result<Response<LeaseTasksResponse>, Status> {
        finish(self.lease(request).await, None)
    }

    #[tracing::instrument(name = "RenewLease", skip_all, fields(rpc.method = "RenewLease", outcome, task_id))]
    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<Lease>, Status> {
        finish(self.renew(request.into_inner()).await, None)
    }

    #[tracing::instrument(
        name = "CompleteTask",
        skip_all,
        fields(rpc.method = "CompleteTask", outcome, task_id)
    )]
    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        finish(self.complete(request.into_inner()).await, None)
    }

    #[tracing::instrument(name = "FailTask", skip_all, fields(rpc.method = "FailTask", outcome, task_id, status))]
    async fn fail_task(&self, request: Request<FailTaskRequest>) -> Result<Response<Task>, Status> {
        finish(self.fail(request.into_inner()).await, None)
    }
}

//! `tasks.v1.WorkerService`.

use tonic::{Request, Response, Status};

use super::{
    ServiceError,
    api_key_gate::caller_and_message,
    deadline::bounded_wait,
    reply::{Success, finish},
};
use crate::{
    domain::{
        Completion, Failure, LeaseQuery, Limits, Principal, Renewal, Role, StoredStatus, TaskId,
        TaskRecord, echo, timestamp, violation::echo_segment,
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
    ) -> Result<Success<LeaseTasksResponse>, ServiceError> {
        let request_timeout = self.policy.request_timeout;
        let wait_cap = |wanted| bounded_wait(request.metadata(), wanted, request_timeout);
        let mut query = LeaseQuery::parse(request.get_ref().clone(), self.policy.default_lease)
            .map_err(ServiceError::InvalidRequest)?;
        if let Some(caller) = request.extensions().get::<Principal>() {
            scope_actions(caller, &mut query)?;
        }
        let wait = wait_cap(query.wait);
        let span = tracing::Span::current();
        span.record("worker_id", echo_segment(&query.worker_id).as_str());
        let leased = queue::lease_tasks(&self.store, &query, &self.policy, wait).await?;
        span.record("leased", leased.len());
        Ok(Success::Ok(LeaseTasksResponse {
            leases: leased.iter().map(lease).collect(),
        }))
    }

    /// Refuses a call about a task whose action the caller does not
    /// perform, as if the task did not exist.
    async fn check_scope(
        &self,
        caller: Option<&Principal>,
        task_id: TaskId,
    ) -> Result<Option<TaskRecord>, ServiceError> {
        let Some(caller) = caller.filter(|c| c.role == Role::Worker && !c.actions.is_empty())
        else {
            return Ok(None);
        };
        match self.store.get_task(task_id.0).await? {
            Some(task) if caller.may_perform(&task.action) => Ok(Some(task)),
            _ => Err(ServiceError::NotFound(format!("no task has id {task_id}"))),
        }
    }

    async fn renew(
        &self,
        caller: Option<&Principal>,
        request: RenewLeaseRequest,
    ) -> Result<Success<Lease>, ServiceError> {
        let renewal = Renewal::parse(&request, self.policy.default_lease)
            .map_err(ServiceError::InvalidRequest)?;
        let task_id = renewal.lease.task_id;
        record_task(task_id);
        self.check_scope(caller, task_id).await?;
        let task = queue::renew_lease(&self.store, &renewal)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        Ok(Success::Ok(lease(&task)))
    }

    async fn complete(
        &self,
        caller: Option<&Principal>,
        request: CompleteTaskRequest,
    ) -> Result<Success<Task>, ServiceError> {
        let completion =
            Completion::parse(&request, &self.limits).map_err(ServiceError::InvalidRequest)?;
        let task_id = completion.lease.task_id;
        record_task(task_id);
        self.check_scope(caller, task_id).await?;
        let task = queue::complete_task(&self.store, &completion)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        Ok(Success::Ok(task.to_task()))
    }

    async fn fail(
        &self,
        caller: Option<&Principal>,
        request: FailTaskRequest,
    ) -> Result<Success<Task>, ServiceError> {
        let failure = Failure::parse(&request).map_err(ServiceError::InvalidRequest)?;
        let task_id = failure.lease.task_id;
        record_task(task_id);
        // The task as the scope check read it, if it did: failing needs it.
        let read = self.check_scope(caller, task_id).await?;
        let task = queue::fail_task(&self.store, &failure, &self.policy, read)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        if let Some(status) = StoredStatus::from_code(task.status.into()) {
            tracing::Span::current().record("status", status.name());
        }
        Ok(Success::Ok(task.to_task()))
    }
}

/// Narrows a lease request to the actions a worker key performs: none asked
/// means the key's actions; asking for another is refused.
fn scope_actions(caller: &Principal, query: &mut LeaseQuery) -> Result<(), ServiceError> {
    if caller.role != Role::Worker || caller.actions.is_empty() {
        return Ok(());
    }
    if query.actions.is_empty() {
        query.actions = caller.actions.clone();
        return Ok(());
    }
    match query.actions.iter().find(|a| !caller.may_perform(a)) {
        Some(action) => Err(ServiceError::PermissionDenied(format!(
            "the key {:?} may not perform {}; it performs {:?}",
            caller.name,
            echo(action),
            caller.actions
        ))),
        None => Ok(()),
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
        let (caller, message) = caller_and_message(request);
        finish(self.renew(caller.as_ref(), message).await, None)
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
        let (caller, message) = caller_and_message(request);
        finish(self.complete(caller.as_ref(), message).await, None)
    }

    #[tracing::instrument(name = "FailTask", skip_all, fields(rpc.method = "FailTask", outcome, task_id, status))]
    async fn fail_task(&self, request: Request<FailTaskRequest>) -> Result<Response<Task>, Status> {
        let (caller, message) = caller_and_message(request);
        finish(self.fail(caller.as_ref(), message).await, None)
    }
}

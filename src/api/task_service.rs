//! `tasks.v1.TaskService`.

use prost::Message;
use tonic::{Request, Response, Status};

use super::{
    ServiceError,
    api_key_gate::caller_and_message,
    deadline::bounded_wait,
    reply::{Success, finish},
};
use crate::{
    auth::KeyRing,
    domain::{
        Limits, ListQuery, NewTask, PageToken, Principal, TaskId, TaskRecord, WaitQuery, echo,
        requests::MAX_PAGE_BYTES,
    },
    idempotency::{
        self, FingerprintAsked, IdempotencyKey, KeyPolicy, KeySource, Legacy, LegacyRecords,
        MissingKeyPolicy, Outcome, ReplayCache,
    },
    proto::tasks_v1::{
        CancelTaskRequest, CreateTaskRequest, GetTaskRequest, ListTasksRequest, ListTasksResponse,
        Task, WaitTaskRequest, task_service_server::TaskService,
    },
    queue::{self, QueuePolicy},
    storage::{StorageError, Store},
};

/// What each task adds to a ListTasks answer around its own bytes: its
/// field tag and length.
const TASK_FRAMING_BYTES: usize = 6;

/// The part of a stored `Task` a replay reads: its id, for the call's
/// span. The stored bytes are what is sent (see `reply::send_stored`), so
/// the rest (the parameters above all) is not decoded only to be dropped;
/// prost still checks that every field is well formed.
#[derive(Clone, PartialEq, Message)]
struct StoredTaskHead {
    #[prost(string, tag = "1")]
    task_id: String,
}

/// The TaskService implementation.
#[derive(Debug, Clone)]
pub struct TaskApi<S> {
    store: S,
    replays: ReplayCache,
    policy: KeyPolicy,
    limits: Limits,
    queue: QueuePolicy,
    /// Every API key, for the names records of the earlier scope were
    /// written under.
    keys: KeyRing,
    legacy: LegacyRecords,
}

impl<S: Store> TaskApi<S> {
    /// A service over `store` that remembers requests as `policy` says
    /// (keeping live records in `replays`, and honouring `legacy` records
    /// written by the keys of `keys`) and waits for tasks as `queue` says.
    pub fn new(
        store: S,
        replays: ReplayCache,
        policy: KeyPolicy,
        limits: Limits,
        queue: QueuePolicy,
        keys: KeyRing,
        legacy: LegacyRecords,
    ) -> Self {
        Self {
            store,
            replays,
            policy,
            limits,
            queue,
            keys,
            legacy,
        }
    }

    async fn create(
        &self,
        source: KeySource<'_>,
        fingerprint_asked: bool,
        caller: Option<&Principal>,
        request: CreateTaskRequest,
    ) -> Result<Success<Task>, ServiceError> {
        if source == KeySource::Fingerprint
            && !fingerprint_asked
            && self.policy.missing_key == MissingKeyPolicy::Reject
        {
            return Err(ServiceError::KeyMissing);
        }
        let task = NewTask::parse(request, &self.limits).map_err(ServiceError::InvalidRequest)?;
        let span = tracing::Span::current();
        span.record("agent_id", task.agent_id.as_str());
        if let Some(caller) = caller.filter(|c| !c.may_act_for(&task.agent_id)) {
            return Err(ServiceError::PermissionDenied(format!(
                "the key {:?} may not create tasks for agent {}; it acts for {:?}",
                caller.name,
                echo(&task.agent_id),
                caller.agent_ids
            )));
        }

        // Records belong to the agent: every key that may act for it
        // shares them. Records of the earlier scope (the API key's name)
        // count while any may be live.
        let live = self.legacy.live();
        let owners = if live {
            self.keys.names_acting_for(&task.agent_id)
        } else {
            Vec::new()
        };
        let twins: Vec<Option<String>> = if self.legacy.dual() {
            match caller {
                Some(caller) => {
                    let mut names = self.keys.agent_keys_for(&task.agent_id);
                    if !names.contains(&caller.name) {
                        names.push(caller.name.clone());
                    }
                    names.into_iter().map(Some).collect()
                }
                None => vec![None],
            }
        } else {
            Vec::new()
        };
        let legacy = Legacy {
            live,
            owners: &owners,
            twins: &twins,
        };
        let done = match idempotency::create_task(
            &self.store,
            &self.replays,
            source,
            &task,
            &self.policy,
            legacy,
        )
        .await?
        {
            Outcome::Created(task) => Success::Created(task),
            Outcome::Replayed(bytes) => {
                let head = StoredTaskHead::decode(bytes.as_slice())
                    .map_err(|e| StorageError::Corrupt(format!("stored response: {e}")))?;
                let task = Task {
                    task_id: head.task_id,
                    ..Task::default()
                };
                Success::Replayed(task, bytes)
            }
            Outcome::Mismatch => return Err(ServiceError::KeyReused),
            Outcome::InFlight => return Err(ServiceError::InProgress),
        };
        if let Success::Created(task) | Success::Replayed(task, _) = &done {
            span.record("task_id", task.task_id.as_str());
        }
        Ok(done)
    }

    async fn get(
        &self,
        caller: Option<&Principal>,
        request: GetTaskRequest,
    ) -> Result<Success<Task>, ServiceError> {
        let task_id = TaskId::parse(&request).map_err(ServiceError::InvalidRequest)?;
        Ok(Success::Ok(
            self.visible_task(caller, task_id).await?.to_task(),
        ))
    }

    /// The task, if it exists and the caller may see it: another agent's
    /// task is answered as one that does not exist, so existence does not
    /// leak.
    async fn visible_task(
        &self,
        caller: Option<&Principal>,
        task_id: TaskId,
    ) -> Result<TaskRecord, ServiceError> {
        self.store
            .get_task(task_id.0)
            .await?
            .filter(|task| caller.is_none_or(|c| c.may_act_for(&task.agent_id)))
            .ok_or_else(|| ServiceError::NotFound(format!("no task has id {task_id}")))
    }

    /// Refuses a call about a task the caller may not see, as if it did not
    /// exist. Without keys every task is visible, and nothing is read: the
    /// call reads the task itself.
    async fn check_visible(
        &self,
        caller: Option<&Principal>,
        task_id: TaskId,
    ) -> Result<(), ServiceError> {
        match caller {
            Some(caller) => self.visible_task(Some(caller), task_id).await.map(drop),
            None => Ok(()),
        }
    }

    async fn list(
        &self,
        caller: Option<&Principal>,
        request: ListTasksRequest,
    ) -> Result<Success<ListTasksResponse>, ServiceError> {
        let query = ListQuery::parse(request).map_err(ServiceError::InvalidRequest)?;
        if caller.is_some_and(|c| !c.may_act_for(&query.agent_id)) {
            return Err(ServiceError::NotFound(format!(
                "no tasks of agent {} are visible to this key",
                echo(&query.agent_id)
            )));
        }
        // One extra row tells whether another page follows; a page also
        // ends early once it holds MAX_PAGE_BYTES, and its token continues.
        let limit = i64::try_from(query.page_size + 1).unwrap_or(i64::MAX);
        let page = self
            .store
            .list_tasks(&query.agent_id, query.after.0, limit, MAX_PAGE_BYTES)
            .await?;
        let mut records = page.tasks;
        let mut more = records.len() > query.page_size || page.cut_by_size;
        records.truncate(query.page_size);
        // The store counts the bytes it keeps (JSON); what is sent can be
        // several times more (a number is 2 bytes of JSON, 11 of protobuf),
        // so the page also ends before its answer passes MAX_PAGE_BYTES.
        let budget = usize::try_from(MAX_PAGE_BYTES).unwrap_or(usize::MAX);
        let mut tasks = Vec::with_capacity(records.len());
        let mut bytes = 0;
        let mut last_seq = None;
        for record in &records {
            let task = record.to_task();
            let size = prost::Message::encoded_len(&task) + TASK_FRAMING_BYTES;
            if !tasks.is_empty() && bytes + size > budget {
                more = true;
                break;
            }
            bytes += size;
            last_seq = Some(record.seq);
            tasks.push(task);
        }
        let next_page_token = match last_seq {
            Some(seq) if more => PageToken(seq).encode(),
            _ => String::new(),
        };
        Ok(Success::Ok(ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }
}

impl<S: Store> TaskApi<S> {
    async fn wait(&self, request: Request<WaitTaskRequest>) -> Result<Success<Task>, ServiceError> {
        let query = WaitQuery::parse(request.get_ref()).map_err(ServiceError::InvalidRequest)?;
        let wait = bounded_wait(
            request.metadata(),
            query.timeout,
            self.queue.request_timeout,
        );
        tracing::Span::current().record("task_id", tracing::field::display(query.task_id));
        self.check_visible(request.extensions().get::<Principal>(), query.task_id)
            .await?;
        let task = queue::wait_task(&self.store, query.task_id.0, wait, self.queue.recheck)
            .await
            .map_err(|e| ServiceError::from_queue(e, query.task_id))?;
        Ok(Success::Ok(task.to_task()))
    }

    async fn cancel(
        &self,
        caller: Option<&Principal>,
        request: CancelTaskRequest,
    ) -> Result<Success<Task>, ServiceError> {
        let task_id = TaskId::parse_cancel(&request).map_err(ServiceError::InvalidRequest)?;
        tracing::Span::current().record("task_id", tracing::field::display(task_id));
        self.check_visible(caller, task_id).await?;
        let task = queue::cancel_task(&self.store, task_id.0)
            .await
            .map_err(|e| ServiceError::from_queue(e, task_id))?;
        Ok(Success::Ok(task.to_task()))
    }
}

#[tonic::async_trait]
impl<S: Store> TaskService for TaskApi<S> {
    #[tracing::instrument(
        name = "CreateTask",
        skip_all,
        fields(rpc.method = "CreateTask", key_source, outcome, agent_id, task_id)
    )]
    async fn create_task(
        &self,
        request: Request<CreateTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        // The idempotency key gate puts a valid key there, or none when the
        // policy lets keyless requests through.
        let key = request.extensions().get::<IdempotencyKey>().cloned();
        let caller = request.extensions().get::<Principal>().cloned();
        let fingerprint_asked = request.extensions().get::<FingerprintAsked>().is_some();
        let source = key
            .as_ref()
            .map_or(KeySource::Fingerprint, KeySource::Header);
        tracing::Span::current().record("key_source", source.as_str());
        finish(
            self.create(
                source,
                fingerprint_asked,
                caller.as_ref(),
                request.into_inner(),
            )
            .await,
            Some(source),
        )
    }

    #[tracing::instrument(name = "GetTask", skip_all, fields(rpc.method = "GetTask", outcome))]
    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let (caller, message) = caller_and_message(request);
        finish(self.get(caller.as_ref(), message).await, None)
    }

    #[tracing::instrument(name = "WaitTask", skip_all, fields(rpc.method = "WaitTask", outcome, task_id))]
    async fn wait_task(&self, request: Request<WaitTaskRequest>) -> Result<Response<Task>, Status> {
        finish(self.wait(request).await, None)
    }

    #[tracing::instrument(name = "CancelTask", skip_all, fields(rpc.method = "CancelTask", outcome, task_id))]
    async fn cancel_task(
        &self,
        request: Request<CancelTaskRequest>,
    ) -> Result<Response<Task>, Status> {
        let (caller, message) = caller_and_message(request);
        finish(self.cancel(caller.as_ref(), message).await, None)
    }

    #[tracing::instrument(name = "ListTasks", skip_all, fields(rpc.method = "ListTasks", outcome))]
    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let (caller, message) = caller_and_message(request);
        finish(self.list(caller.as_ref(), message).await, None)
    }
}

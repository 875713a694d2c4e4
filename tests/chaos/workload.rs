//! The workload: agents that create tasks from a small pool of keys and
//! retry every unknown outcome with the same key (often on another
//! instance), keyless agents deduplicated by fingerprint, and workers that
//! lease, sometimes walk away from a lease as if they had died, fail, renew
//! and complete.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use oncely_client::{
    json,
    metadata::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED},
    proto::tasks_v1::{
        CompleteTaskRequest, CreateTaskRequest, FailTaskRequest, Lease, LeaseTasksRequest,
        RenewLeaseRequest, task_service_client::TaskServiceClient,
        worker_service_client::WorkerServiceClient,
    },
};
use tokio::time::Instant;
use tonic::Code;
use uuid::Uuid;

use crate::{
    cluster::{Cluster, LEASE, authorized},
    history::{Answer, Completion, CreateAttempt, Created, Grant, History, KeyRef, bump, micros},
};

/// How many tasks a worker works on at once.
const WORKER_CONCURRENCY: usize = 8;

/// The action every task of the workload has.
pub(crate) const ACTION: &str = "chaos.deliver";

/// How long one key is used, from its first send: well under the retention
/// (30 s), so that every send of a key falls within it and a second task for
/// a key is always a bug. Retries of a create stop when it runs out.
const KEY_LIFETIME: Duration = Duration::from_secs(8);

/// How many times a key is picked on average: most sends repeat a key
/// (besides the retries of each send).
const SENDS_PER_KEY: u32 = 4;

/// How many keys are in use at once: few, so that most sends repeat one.
const KEYED_SLOTS: usize = 24;
const KEYLESS_SLOTS: usize = 8;

/// One key in use.
#[derive(Clone)]
struct Slot {
    key: KeyRef,
    request: CreateTaskRequest,
    use_until: Instant,
    /// How many more sends pick this key before a fresh one replaces it.
    sends_left: u32,
    acknowledged: bool,
}

/// The keys in use; each is replaced by a fresh one when its time is up.
pub(crate) struct KeyPool {
    keyed: Mutex<Vec<Option<Slot>>>,
    keyless: Mutex<Vec<Option<Slot>>>,
}

impl KeyPool {
    pub(crate) fn new() -> Self {
        Self {
            keyed: Mutex::new(vec![None; KEYED_SLOTS]),
            keyless: Mutex::new(vec![None; KEYLESS_SLOTS]),
        }
    }

    /// A key of a random slot, fresh when the slot's key has had its time.
    fn pick(&self, keyless: bool, rng: &mut fastrand::Rng, history: &History) -> Slot {
        let slots = if keyless { &self.keyless } else { &self.keyed };
        let mut slots = slots.lock().expect("lock");
        let index = rng.usize(..slots.len());
        let now = Instant::now();
        match &mut slots[index] {
            Some(slot) if slot.use_until > now && slot.sends_left > 0 => {
                slot.sends_left -= 1;
                slot.clone()
            }
            _ => {
                let id = Uuid::new_v4();
                let key = if keyless {
                    KeyRef::Keyless(id)
                } else {
                    KeyRef::Keyed(id)
                };
                let request = request_for(key, rng.u32(..1_000_000), false);
                history
                    .requests
                    .lock()
                    .expect("lock")
                    .insert(key, request.clone());
                let slot = Slot {
                    key,
                    request,
                    use_until: now + KEY_LIFETIME,
                    sends_left: rng.u32(0..SENDS_PER_KEY * 2),
                    acknowledged: false,
                };
                slots[index] = Some(slot.clone());
                slot
            }
        }
    }

    fn acknowledge(&self, key: KeyRef) {
        let slots = match key {
            KeyRef::Keyed(_) => &self.keyed,
            KeyRef::Keyless(_) => &self.keyless,
        };
        for slot in slots.lock().expect("lock").iter_mut().flatten() {
            if slot.key == key {
                slot.acknowledged = true;
            }
        }
    }
}

/// The request a key stands for; a variant differs in one value of its
/// parameters, for the same agent (keys are the agent's: another agent's
/// request under the key would be that agent's own).
fn request_for(key: KeyRef, amount: u32, variant: bool) -> CreateTaskRequest {
    let (member, id) = key.member();
    let agent_id = format!("chaos-agent-{}", amount % 4);
    let amount = if variant { amount + 1 } else { amount };
    let parameters = serde_json::json!({
        member: id.to_string(),
        "amount": amount,
        "currency": "EUR",
        "to": format!("customer-{}@example.com", amount % 97),
        "tags": ["chaos", if variant { "variant" } else { "original" }],
    });
    CreateTaskRequest {
        agent_id,
        action: ACTION.into(),
        parameters: Some(json::to_struct(parameters).expect("an object")),
    }
}

/// What agents and workers share.
pub(crate) struct Workload {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) history: Arc<History>,
    pub(crate) keys: KeyPool,
    /// Agents stop starting creates.
    pub(crate) agents_stop: AtomicBool,
    /// Workers stop walking away from leases and failing tasks.
    pub(crate) draining: AtomicBool,
    /// Workers stop.
    pub(crate) workers_stop: AtomicBool,
}

impl Workload {
    fn instances(&self) -> usize {
        self.cluster.instances.len()
    }

    fn task_client(&self, instance: usize) -> TaskServiceClient<tonic::transport::Channel> {
        TaskServiceClient::new(self.cluster.instances[instance].channel.clone())
    }

    fn worker_client(&self, instance: usize) -> WorkerServiceClient<tonic::transport::Channel> {
        WorkerServiceClient::new(self.cluster.instances[instance].channel.clone())
    }
}

/// Whether a refusal is final: retrying the same request cannot change it.
/// Everything else (deadlines, UNAVAILABLE, a broken connection, a request
/// in progress, shed load) is an unknown outcome, retried.
fn is_final(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// Runs a call with a deadline the server sees (`grpc-timeout`) and a
/// little more on the client's side; a client's cancel cuts it at `cancel`.
async fn call<T, F>(
    history: &History,
    deadline: Duration,
    cancel: Option<Duration>,
    future: F,
) -> Answer<T>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let limit = cancel.unwrap_or(deadline + Duration::from_millis(250));
    match tokio::time::timeout(limit, future).await {
        Err(_) if cancel.is_some() => Answer::Unknown("cancelled by the client".into()),
        Err(_) => Answer::Unknown("no answer within the deadline".into()),
        Ok(Ok(response)) => Answer::Ok(response.into_inner()),
        // INTERNAL from the server itself (its message, or any metadata;
        // the status tonic makes of a broken HTTP/2 stream has none) is a
        // failure the server did not classify: under these faults, every
        // one is transient and must be UNAVAILABLE. Retried, and reported.
        Ok(Err(status))
            if status.code() == Code::Internal
                && (status.message() == "internal error" || !status.metadata().is_empty()) =>
        {
            let message = status.message().to_owned();
            history.internal.lock().expect("lock").push(message.clone());
            Answer::Unknown(format!("Internal: {message}"))
        }
        Ok(Err(status)) if is_final(status.code()) => {
            Answer::Refused(status.code(), status.message().to_owned())
        }
        Ok(Err(status)) => Answer::Unknown(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// A duration as the protos carry it.
fn duration(duration: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(duration).ok()
}

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// An agent: one logical create after another until told to stop.
pub(crate) async fn agent(work: Arc<Workload>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !work.agents_stop.load(Ordering::SeqCst) {
        let keyless = rng.f64() < 0.15;
        let slot = work.keys.pick(keyless, &mut rng, &work.history);
        let variant = slot.acknowledged && !keyless && rng.f64() < 0.03;
        create(&work, &mut rng, slot, variant).await;
        // An agent thinks between calls.
        tokio::time::sleep(Duration::from_millis(rng.u64(5..50))).await;
    }
}

/// One logical create: retried with the same key until an answer is
/// final, or the key's time is up.
async fn create(work: &Workload, rng: &mut fastrand::Rng, slot: Slot, variant: bool) {
    let counts = &work.history.counts;
    bump(&counts.creates);
    if variant {
        bump(&counts.variants);
    }
    if matches!(slot.key, KeyRef::Keyless(_)) {
        bump(&counts.keyless);
    }
    let request = if variant {
        let amount = slot.request.parameters.as_ref().map_or(0, |p| {
            json::from_struct(p)
                .get("amount")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0) as u32
        });
        request_for(slot.key, amount, true)
    } else {
        slot.request.clone()
    };
    let mut instance = rng.usize(..work.instances());
    loop {
        if Instant::now() >= slot.use_until {
            bump(&counts.abandoned);
            return;
        }
        bump(&counts.create_attempts);
        let deadline = Duration::from_millis(rng.u64(100..2000));
        let cancel = (rng.f64() < 0.05).then(|| Duration::from_millis(rng.u64(0..30)));
        let mut message = authorized(
            with_deadline(request.clone(), deadline),
            &work.cluster.keys.agent(rng),
        );
        if let KeyRef::Keyed(key) = slot.key {
            message.metadata_mut().insert(
                IDEMPOTENCY_KEY,
                key.to_string().parse().expect("a UUID is ASCII"),
            );
        }
        let mut client = work.task_client(instance);
        let sent = std::time::Instant::now();
        let answer = call(&work.history, deadline, cancel, async move {
            let response = client.create_task(message).await?;
            let replayed = response
                .metadata()
                .get(IDEMPOTENT_REPLAYED)
                .is_some_and(|v| v == "true");
            Ok(tonic::Response::new(Created {
                task: response.into_inner(),
                replayed,
            }))
        })
        .await;
        let received = std::time::Instant::now();
        let settled = !matches!(answer, Answer::Unknown(_));
        if let Answer::Unknown(why) = &answer
            && why.starts_with("cancelled")
        {
            bump(&counts.client_cancels);
        }
        if matches!(answer, Answer::Ok(_)) {
            bump(&counts.acknowledged);
            if !variant {
                work.keys.acknowledge(slot.key);
            }
        }
        work.history
            .creates
            .lock()
            .expect("lock")
            .push(CreateAttempt {
                key: slot.key,
                variant,
                answer,
                sent,
                received,
            });
        // A variant is sent once: its point is the refusal.
        if settled || variant {
            return;
        }
        if rng.bool() {
            instance = rng.usize(..work.instances());
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(10..150))).await;
    }
}

/// A worker: leases tasks and handles each until told to stop.
pub(crate) async fn worker(work: Arc<Workload>, id: usize, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let worker_id = format!("chaos-worker-{id}");
    let room = Arc::new(tokio::sync::Semaphore::new(WORKER_CONCURRENCY));
    let mut handles = tokio::task::JoinSet::new();
    while !work.workers_stop.load(Ordering::SeqCst) {
        while handles.try_join_next().is_some() {}
        let free = room.available_permits().max(1) as i32;
        let instance = rng.usize(..work.instances());
        bump(&work.history.counts.lease_calls);
        let request = LeaseTasksRequest {
            worker_id: worker_id.clone(),
            actions: vec![ACTION.into()],
            max_tasks: rng.i32(1..=4).min(free),
            lease_duration: duration(LEASE),
            wait: duration(Duration::from_secs(1)),
        };
        let mut client = work.worker_client(instance);
        let api_key = work.cluster.keys.worker.clone();
        let deadline = Duration::from_secs(3);
        let answer = call(&work.history, deadline, None, async move {
            client
                .lease_tasks(authorized(with_deadline(request, deadline), &api_key))
                .await
        })
        .await;
        match answer {
            // A worker works on several tasks at once, and asks for more
            // as soon as it has room.
            Answer::Ok(leased) => {
                for lease in leased.leases {
                    let permit = room.clone().acquire_owned().await.expect("never closed");
                    let (work, seed) = (work.clone(), rng.u64(..));
                    handles.spawn(async move {
                        let mut rng = fastrand::Rng::with_seed(seed);
                        handle(&work, &mut rng, instance, lease).await;
                        drop(permit);
                    });
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.u64(50..200))).await,
        }
    }
    while handles.join_next().await.is_some() {}
}

/// Handles one lease: walk away, fail, or (renew and) complete.
async fn handle(work: &Workload, rng: &mut fastrand::Rng, mut instance: usize, lease: Lease) {
    let counts = &work.history.counts;
    let Some(task) = lease.task else { return };
    let token = lease.lease_token.clone();
    let received = Instant::now();
    bump(&counts.leases);
    work.history.grants.lock().expect("lock").push(Grant {
        task_id: task.task_id.clone(),
        token: token.clone(),
        attempt: task.attempt,
        granted_us: micros(task.update_time.as_ref()),
        expires_us: micros(lease.expire_time.as_ref()),
    });
    let draining = work.draining.load(Ordering::SeqCst);
    if !draining && rng.f64() < 0.08 {
        // Dies mid-lease: the lease runs out and the task goes to another.
        bump(&counts.deaths);
        return;
    }
    if !draining && rng.f64() < 0.08 {
        bump(&counts.fails);
        work.history.fails.lock().expect("lock").push(token.clone());
        let request = FailTaskRequest {
            task_id: task.task_id.clone(),
            lease_token: token,
            error_message: "the chaos worker's delivery failed".into(),
            permanent: false,
            retry_after: duration(Duration::from_millis(100)),
        };
        let mut client = work.worker_client(instance);
        let api_key = work.cluster.keys.worker.clone();
        let deadline = Duration::from_secs(1);
        let _ = call(&work.history, deadline, None, async move {
            client
                .fail_task(authorized(with_deadline(request, deadline), &api_key))
                .await
        })
        .await;
        return;
    }
    if rng.f64() < 0.2 {
        bump(&counts.renews);
        let request = RenewLeaseRequest {
            task_id: task.task_id.clone(),
            lease_token: token.clone(),
            lease_duration: duration(LEASE),
        };
        let mut client = work.worker_client(instance);
        let api_key = work.cluster.keys.worker.clone();
        let deadline = Duration::from_secs(1);
        let answer = call(&work.history, deadline, None, async move {
            client
                .renew_lease(authorized(with_deadline(request, deadline), &api_key))
                .await
        })
        .await;
        if let Answer::Ok(renewed) = answer {
            work.history
                .renewals
                .lock()
                .expect("lock")
                .push((token.clone(), micros(renewed.expire_time.as_ref())));
        }
    }
    // The work itself takes a moment; now and then far longer than the
    // lease (a worker stalled, thought dead, that comes back): by then the
    // task may be another worker's, and this completion must be refused.
    if !draining && rng.f64() < 0.05 {
        bump(&counts.stalls);
        tokio::time::sleep(LEASE + Duration::from_millis(rng.u64(0..4000))).await;
    } else if rng.f64() < 0.1 {
        tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
    } else {
        tokio::time::sleep(Duration::from_millis(rng.u64(0..20))).await;
    }
    let result = serde_json::json!({"token": token, "worker": format!("{instance}")});
    // Retried with the same token and result for a while; once another
    // worker has the task the server refuses with LEASE_LOST. (A stalled
    // worker whose stall outlasted this gives up without a call.)
    let mut sent = false;
    while received.elapsed() < LEASE * 2 {
        if !sent {
            bump(&counts.completes);
            sent = true;
        }
        let request = CompleteTaskRequest {
            task_id: task.task_id.clone(),
            lease_token: token.clone(),
            result: Some(json::to_struct(result.clone()).expect("an object")),
        };
        let mut client = work.worker_client(instance);
        let api_key = work.cluster.keys.worker.clone();
        let deadline = Duration::from_millis(rng.u64(200..1500));
        let answer = call(&work.history, deadline, None, async move {
            client
                .complete_task(authorized(with_deadline(request, deadline), &api_key))
                .await
        })
        .await;
        let settled = !matches!(answer, Answer::Unknown(_));
        work.history
            .completions
            .lock()
            .expect("lock")
            .push(Completion {
                task_id: task.task_id.clone(),
                token: token.clone(),
                result: result.clone(),
                answer,
            });
        if settled {
            return;
        }
        instance = rng.usize(..work.instances());
        tokio::time::sleep(Duration::from_millis(rng.u64(20..150))).await;
    }
}

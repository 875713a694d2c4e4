//! The task lifecycle: workers lease, renew, complete and fail tasks;
//! agents wait for them and cancel them.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use oncely::proto::tasks_v1::{
    CancelTaskRequest, CompleteTaskRequest, FailTaskRequest, Lease, LeaseTasksRequest,
    RenewLeaseRequest, Task, TaskStatus, WaitTaskRequest,
    worker_service_client::WorkerServiceClient,
};
use serde_json::json;
use tokio::sync::Mutex;
use tonic::{Code, Status, transport::Channel};

use crate::support::{
    Backend, BinaryServer, TestApp, TestDb, assert_invalid, assert_status, email_request, new_key,
    request, scrape_until, started, test_settings, value, violated_fields,
};

fn workers(app: &TestApp) -> WorkerServiceClient<Channel> {
    WorkerServiceClient::new(app.channel.clone())
}

fn seconds(s: f64) -> prost_types::Duration {
    let d = Duration::from_secs_f64(s);
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Leases up to `max` tasks for `lease_secs`, waiting up to `wait_secs`.
async fn lease(app: &TestApp, max: i32, lease_secs: f64, wait_secs: f64) -> Vec<Lease> {
    let request = LeaseTasksRequest {
        worker_id: "test-worker".into(),
        actions: vec![],
        max_tasks: max,
        lease_duration: Some(seconds(lease_secs)),
        wait: (wait_secs > 0.0).then(|| seconds(wait_secs)),
    };
    leases(workers(app), request).await
}

/// LeaseTasks, which must succeed: the leases it grants.
async fn leases(
    mut workers: WorkerServiceClient<Channel>,
    request: LeaseTasksRequest,
) -> Vec<Lease> {
    workers
        .lease_tasks(request)
        .await
        .expect("lease")
        .into_inner()
        .leases
}

async fn lease_one(app: &TestApp) -> Lease {
    let mut leases = lease(app, 1, 30.0, 0.0).await;
    assert_eq!(leases.len(), 1, "one task should be available");
    leases.remove(0)
}

fn task_id(lease: &Lease) -> String {
    lease.task.as_ref().expect("task").task_id.clone()
}

async fn complete(app: &TestApp, lease: &Lease, result: serde_json::Value) -> Result<Task, Status> {
    workers(app)
        .complete_task(CompleteTaskRequest {
            task_id: task_id(lease),
            lease_token: lease.lease_token.clone(),
            result: Some(oncely_client::json::to_struct(result).expect("an object")),
        })
        .await
        .map(|r| r.into_inner())
}

async fn fail(
    app: &TestApp,
    lease: &Lease,
    permanent: bool,
    retry_after: Option<f64>,
) -> Result<Task, Status> {
    workers(app)
        .fail_task(FailTaskRequest {
            task_id: task_id(lease),
            lease_token: lease.lease_token.clone(),
            error_message: "the mail server said 451".into(),
            permanent,
            retry_after: retry_after.map(seconds),
        })
        .await
        .map(|r| r.into_inner())
}

async fn renew(app: &TestApp, lease: &Lease) -> Result<Lease, Status> {
    workers(app)
        .renew_lease(RenewLeaseRequest {
            task_id: task_id(lease),
            lease_token: lease.lease_token.clone(),
            lease_duration: None,
        })
        .await
        .map(|r| r.into_inner())
}

async fn wait(app: &TestApp, task_id: &str, timeout_secs: f64) -> Result<Task, Status> {
    app.tasks
        .clone()
        .wait_task(WaitTaskRequest {
            task_id: task_id.into(),
            timeout: Some(seconds(timeout_secs)),
        })
        .await
        .map(|r| r.into_inner())
}

async fn cancel(app: &TestApp, task_id: &str) -> Result<Task, Status> {
    app.tasks
        .clone()
        .cancel_task(CancelTaskRequest {
            task_id: task_id.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// How long the long polls and waits that something should wake ask to
/// wait, in seconds: far longer than [`woken`] gives them.
const LONG_WAIT: f64 = 50.0;

/// The answer of a long poll or wait (of [`LONG_WAIT`]) that something
/// should have woken: a liveness check, not a measurement. Without the
/// wake-up it would answer only when its own wait ran out.
async fn woken<T>(call: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(25), call)
        .await
        .expect("woken by the change, not left to wait out its time")
        .expect("join")
}

/// The binary on `db`, its waiters re-reading the database only once a
/// minute, so a test passes only if the wake-ups themselves work. It runs
/// as a process of its own so that its metrics count only this test's
/// calls: they show when a call waits. Returns it, its metrics' URL, and
/// clients for it.
async fn start_without_rechecks(db: &TestDb) -> (BinaryServer, String, Arc<TestApp>) {
    let (server, metrics) =
        BinaryServer::start_with_metrics_and(db, &[("QUEUE_RECHECK_INTERVAL", "60s")]).await;
    let app = Arc::new(TestApp::connect_to(server.addr()));
    (server, format!("http://{metrics}/metrics"), app)
}

/// Waits until `polls` LeaseTasks long polls wait for a task, having found
/// none, at the binary whose metrics are at `metrics`.
async fn polls_waiting(metrics: &str, polls: f64) {
    scrape_until(metrics, "the long poll to wait for a task", |scrape| {
        value(scrape, "oncely_lease_polls_waiting", &[]) == Some(polls)
    })
    .await;
}

/// A long poll for one task at `app`, started in the background and
/// returned once the binary whose metrics are at `metrics` shows it
/// waiting (having found none).
async fn poll_that_waits(app: &Arc<TestApp>, metrics: &str) -> tokio::task::JoinHandle<Vec<Lease>> {
    let polling = {
        let app = app.clone();
        tokio::spawn(async move { lease(&app, 1, 30.0, LONG_WAIT).await })
    };
    polls_waiting(metrics, 1.0).await;
    polling
}

/// Waits until the server has started `calls` WaitTask calls at the binary
/// whose metrics are at `metrics`.
async fn waits_started(metrics: &str, calls: usize) {
    started(metrics, "tasks.v1.TaskService", "WaitTask", calls).await;
}

/// Sleeps until `lease` has run out, by the expiry the server gave it.
async fn until_expired(lease: &Lease) {
    let expiry = lease.expire_time.as_ref().expect("an expiry");
    let expiry = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(expiry.seconds).expect("after 1970"),
            u32::try_from(expiry.nanos).expect("valid nanos"),
        );
    if let Ok(left) = expiry.duration_since(SystemTime::now()) {
        // A little past it: the stores keep microseconds.
        tokio::time::sleep(left + Duration::from_millis(100)).await;
    }
}

async fn racing_workers_complete_every_task_exactly_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    db.insert_tasks("bulk", 1000).await;
    let leased = Arc::new(Mutex::new(Vec::new()));

    let workers: Vec<_> = (0..8)
        .map(|w| {
            let mut client = workers(&app);
            let leased = leased.clone();
            tokio::spawn(async move {
                loop {
                    let leases = client
                        .lease_tasks(LeaseTasksRequest {
                            worker_id: format!("worker-{w}"),
                            max_tasks: 10,
                            ..Default::default()
                        })
                        .await
                        .expect("lease")
                        .into_inner()
                        .leases;
                    if leases.is_empty() {
                        return;
                    }
                    for lease in leases {
                        let id = task_id(&lease);
                        leased.lock().await.push(id.clone());
                        client
                            .complete_task(CompleteTaskRequest {
                                task_id: id.clone(),
                                lease_token: lease.lease_token,
                                result: oncely_client::json::to_struct(json!({"by": w})).ok(),
                            })
                            .await
                            .expect("complete under a live lease");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }

    let leased = leased.lock().await;
    let distinct: HashSet<_> = leased.iter().collect();
    assert_eq!(leased.len(), 1000, "every task leased once, none twice");
    assert_eq!(distinct.len(), 1000);
    assert_eq!(
        db.count_tasks_with_status(TaskStatus::Succeeded).await,
        1000
    );
}

async fn a_long_poll_answers_as_soon_as_a_task_is_created(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (_server, metrics, app) = start_without_rechecks(&db).await;
    let polling = poll_that_waits(&app, &metrics).await;

    let created = app.create_email().await;

    let leases = woken(polling).await;
    assert_eq!(leases.len(), 1);
    assert_eq!(task_id(&leases[0]), created.task_id);
    let task = leases[0].task.as_ref().expect("task");
    assert_eq!(task.status(), TaskStatus::Running);
    assert_eq!(task.attempt, 1);
    assert!(uuid::Uuid::parse_str(&leases[0].lease_token).is_ok());
}

async fn a_long_poll_with_nothing_to_do_answers_empty_when_its_wait_runs_out(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    let leases = lease(&app, 5, 30.0, 0.5).await;

    assert!(leases.is_empty());
}

async fn an_expired_lease_is_leased_again_and_the_old_token_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    let first = lease(&app, 1, 1.0, 0.0).await.remove(0);

    let second = lease(&app, 1, 30.0, 30.0).await.remove(0);

    assert_eq!(task_id(&second), created.task_id);
    assert_eq!(second.task.as_ref().expect("task").attempt, 2);
    assert_ne!(second.lease_token, first.lease_token);
    for refused in [
        complete(&app, &first, json!({})).await,
        fail(&app, &first, false, None).await,
        renew(&app, &first)
            .await
            .map(|l| l.task.unwrap_or_default()),
    ] {
        assert_status(refused, Code::FailedPrecondition, Some("LEASE_LOST"));
    }
    let task = app.task(&created.task_id).await;
    assert_eq!(task.status(), TaskStatus::Running);
    assert!(
        task.error_message.contains("expired"),
        "{}",
        task.error_message
    );
    complete(&app, &second, json!({"sent": true}))
        .await
        .expect("the current lease completes");
}

async fn renewing_a_lease_extends_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create_email().await;
    // Long enough that the renewal surely comes before it runs out.
    let leased = lease(&app, 1, 5.0, 0.0).await.remove(0);

    let renewed = renew(&app, &leased).await.expect("renew");

    assert_eq!(renewed.lease_token, leased.lease_token);
    let before = leased.expire_time.as_ref().expect("expiry").seconds;
    assert!(renewed.expire_time.expect("expiry").seconds >= before + 20);
    until_expired(&leased).await;
    assert!(
        lease(&app, 1, 30.0, 0.0).await.is_empty(),
        "the renewed lease still holds"
    );
}

async fn a_repeated_completion_returns_the_same_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create_email().await;
    let leased = lease_one(&app).await;

    let first = complete(&app, &leased, json!({"message_id": "m-1", "n": 1})).await;
    let again = complete(&app, &leased, json!({"n": 1.0, "message_id": "m-1"})).await;
    let other = complete(&app, &leased, json!({"message_id": "m-2"})).await;

    let first = first.expect("complete");
    assert_eq!(first.status(), TaskStatus::Succeeded);
    assert_eq!(again.expect("the same completion again"), first);
    assert_status(other, Code::FailedPrecondition, Some("TASK_FINISHED"));
    assert_status(
        fail(&app, &leased, false, None).await,
        Code::FailedPrecondition,
        Some("TASK_FINISHED"),
    );
}

/// Completions sent at once share batches; each still gets its own outcome,
/// a repeat of one in the same batch included.
async fn completions_at_once_each_get_their_own_outcome(backend: Backend) {
    const TASKS: usize = 24;
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    for _ in 0..=TASKS {
        app.create_email().await;
    }
    let mut leases = lease(&app, TASKS as i32 + 1, 30.0, 0.0).await;
    assert_eq!(leases.len(), TASKS + 1);
    let stale = Lease {
        lease_token: uuid::Uuid::new_v4().to_string(),
        ..leases.pop().expect("a lease")
    };

    // Each lease completed twice with its own result, and one more task
    // with a token that was never given.
    let calls = 2 * TASKS + 1;
    let barrier = Arc::new(tokio::sync::Barrier::new(calls));
    let mut sent = Vec::new();
    for (i, leased) in leases
        .iter()
        .enumerate()
        .flat_map(|(i, l)| [(i, l.clone()), (i, l.clone())])
        .chain([(usize::MAX, stale)])
    {
        let mut workers = workers(&app);
        let barrier = barrier.clone();
        sent.push(tokio::spawn(async move {
            let request = CompleteTaskRequest {
                task_id: task_id(&leased),
                lease_token: leased.lease_token.clone(),
                result: Some(oncely_client::json::to_struct(json!({"n": i})).expect("an object")),
            };
            barrier.wait().await;
            let answer = workers.complete_task(request).await.map(|r| r.into_inner());
            (i, task_id(&leased), answer)
        }));
    }

    let mut answered = HashSet::new();
    for call in sent {
        let (i, id, answer) = call.await.expect("join");
        if i == usize::MAX {
            assert_status(answer, Code::FailedPrecondition, Some("LEASE_LOST"));
            continue;
        }
        let task = answer.unwrap_or_else(|e| panic!("completion {i}: {e:?}"));
        assert_eq!(task.task_id, id);
        assert_eq!(task.status(), TaskStatus::Succeeded);
        let result = oncely_client::json::from_struct(task.result.as_ref().expect("a result"));
        assert_eq!(
            serde_json::Value::Object(result),
            json!({"n": i}),
            "task {id} has its own result"
        );
        answered.insert(id);
    }
    assert_eq!(answered.len(), TASKS, "every task answered");
    assert_eq!(
        db.count_tasks_with_status(TaskStatus::Succeeded).await,
        TASKS as i64
    );
    assert_eq!(db.count_tasks_with_status(TaskStatus::Running).await, 1);
}

/// A completion the database refuses, sent at once with others that share
/// its batch, fails alone: the others are done, each with its own result,
/// and its task keeps its lease.
async fn a_completion_the_database_refuses_fails_alone_in_its_batch(backend: Backend) {
    const TASKS: usize = 16;
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    for _ in 0..TASKS {
        app.create_email().await;
    }
    let leases = lease(&app, TASKS as i32, 30.0, 0.0).await;
    assert_eq!(leases.len(), TASKS);
    db.refuse_task_updates_where("CAST(NEW.result AS TEXT) LIKE '%refuse-me%'")
        .await;
    let refused = 5;

    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut sent = Vec::new();
    for (i, leased) in leases.into_iter().enumerate() {
        let mut workers = workers(&app);
        let barrier = barrier.clone();
        let result = if i == refused {
            json!({"n": i, "note": "refuse-me"})
        } else {
            json!({"n": i})
        };
        sent.push(tokio::spawn(async move {
            let request = CompleteTaskRequest {
                task_id: task_id(&leased),
                lease_token: leased.lease_token.clone(),
                result: Some(oncely_client::json::to_struct(result).expect("an object")),
            };
            barrier.wait().await;
            let answer = workers.complete_task(request).await.map(|r| r.into_inner());
            (i, task_id(&leased), answer)
        }));
    }

    for call in sent {
        let (i, id, answer) = call.await.expect("join");
        if i == refused {
            let error = answer.expect_err("the refused completion fails");
            // The database's error, which the caller is not shown.
            assert_eq!(error.code(), Code::Internal, "{error:?}");
            continue;
        }
        let task = answer.unwrap_or_else(|e| panic!("completion {i}: {e:?}"));
        assert_eq!(task.task_id, id);
        assert_eq!(task.status(), TaskStatus::Succeeded);
        let result = oncely_client::json::from_struct(task.result.as_ref().expect("a result"));
        assert_eq!(serde_json::Value::Object(result), json!({"n": i}));
    }
    assert_eq!(
        db.count_tasks_with_status(TaskStatus::Succeeded).await,
        TASKS as i64 - 1
    );
    assert_eq!(db.count_tasks_with_status(TaskStatus::Running).await, 1);
}

/// Polls sent at once share a batch; one the database refuses to lease to
/// fails alone, and the others each get their task.
async fn a_lease_the_database_refuses_fails_alone_in_its_batch(backend: Backend) {
    const POLLS: usize = 8;
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    for _ in 0..POLLS {
        app.create_email().await;
    }
    db.refuse_task_updates_where("NEW.worker_id = 'refused-worker'")
        .await;

    let barrier = Arc::new(tokio::sync::Barrier::new(POLLS));
    let mut sent = Vec::new();
    for i in 0..POLLS {
        let mut workers = workers(&app);
        let barrier = barrier.clone();
        let worker_id = if i == 0 {
            "refused-worker".to_owned()
        } else {
            format!("worker-{i}")
        };
        sent.push(tokio::spawn(async move {
            let request = LeaseTasksRequest {
                worker_id,
                max_tasks: 1,
                ..Default::default()
            };
            barrier.wait().await;
            (
                i,
                workers
                    .lease_tasks(request)
                    .await
                    .map(|r| r.into_inner().leases),
            )
        }));
    }

    let mut leased = HashSet::new();
    for call in sent {
        let (i, answer) = call.await.expect("join");
        if i == 0 {
            let error = answer.expect_err("the refused lease fails");
            // The database's error, which the caller is not shown.
            assert_eq!(error.code(), Code::Internal, "{error:?}");
            continue;
        }
        let leases = answer.unwrap_or_else(|e| panic!("poll {i}: {e:?}"));
        assert_eq!(leases.len(), 1, "poll {i} gets one task");
        assert!(leased.insert(task_id(&leases[0])), "a task leased twice");
    }
    assert_eq!(
        db.count_tasks_with_status(TaskStatus::Running).await,
        POLLS as i64 - 1
    );
    assert_eq!(db.count_tasks_with_status(TaskStatus::Queued).await, 1);
}

async fn a_retryable_failure_is_leased_again_after_its_backoff(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    let leased = lease_one(&app).await;

    // Long enough that the next lease surely comes before it ends.
    let failed = fail(&app, &leased, false, Some(5.0)).await.expect("fail");

    assert_eq!(failed.status(), TaskStatus::Queued);
    assert_eq!(failed.error_message, "the mail server said 451");
    assert!(
        lease(&app, 1, 30.0, 0.0).await.is_empty(),
        "still backing off"
    );
    let again = lease(&app, 1, 30.0, 30.0).await.remove(0);
    assert_eq!(task_id(&again), created.task_id);
    assert_eq!(again.task.as_ref().expect("task").attempt, 2);
}

async fn the_server_backoff_is_random_up_to_a_doubling_capped_ceiling(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.queue.backoff_base = Duration::from_secs(100);
    settings.queue.backoff_max = Duration::from_secs(150);
    let app = TestApp::spawn_with(settings).await;
    const TASKS: usize = 30;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        tasks.push(app.create_email().await.task_id);
    }

    // Attempt 1 fails with the server's backoff: up to 100 s.
    let mut first_delays = Vec::new();
    for leased in lease(&app, TASKS as i32, 30.0, 0.0).await {
        fail(&app, &leased, false, None).await.expect("fail");
        first_delays.push(db.seconds_until_leasable(&task_id(&leased)).await);
    }
    // Attempt 2 fails the same way: up to 2 x 100 s, capped at 150 s.
    db.make_leasable_now().await;
    let mut second_delays = Vec::new();
    for leased in lease(&app, TASKS as i32, 30.0, 0.0).await {
        assert_eq!(leased.task.as_ref().expect("task").attempt, 2);
        fail(&app, &leased, false, None).await.expect("fail");
        second_delays.push(db.seconds_until_leasable(&task_id(&leased)).await);
    }

    assert_eq!((first_delays.len(), second_delays.len()), (TASKS, TASKS));
    let longest = |d: &[f64]| d.iter().copied().fold(0.0, f64::max);
    assert!(
        first_delays.iter().all(|d| (0.0..=100.5).contains(d)),
        "{first_delays:?}"
    );
    assert!(
        second_delays.iter().all(|d| (0.0..=150.5).contains(d)),
        "{second_delays:?}"
    );
    // Full jitter: with 30 draws each, the longest is past half the
    // ceiling (and the second ceiling is past the first) but for odds of
    // about one in a million.
    assert!(longest(&first_delays) > 50.0, "{first_delays:?}");
    assert!(longest(&second_delays) > 100.0, "{second_delays:?}");
}

async fn a_task_failed_without_delay_wakes_a_waiting_worker(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (_server, metrics, app) = start_without_rechecks(&db).await;
    app.create_email().await;
    let leased = lease_one(&app).await;
    let polling = poll_that_waits(&app, &metrics).await;

    fail(&app, &leased, false, Some(0.0)).await.expect("fail");

    let again = woken(polling).await;
    assert_eq!(again.len(), 1, "the waiting worker was woken");
    assert_eq!(task_id(&again[0]), task_id(&leased));
}

async fn a_task_failed_for_its_last_lease_does_not_take_a_place_in_the_poll(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.queue.max_attempts = 1;
    let app = TestApp::spawn_with(settings).await;
    let abandoned = app.create_email().await;
    let last = lease(&app, 1, 1.0, 0.0).await.remove(0);
    until_expired(&last).await;
    let waiting = app.create_email().await;

    let leases = lease(&app, 1, 30.0, 0.0).await;

    assert_eq!(leases.len(), 1, "the queued task, past the abandoned one");
    assert_eq!(task_id(&leases[0]), waiting.task_id);
    assert_eq!(
        app.task(&abandoned.task_id).await.status(),
        TaskStatus::Failed
    );
}

async fn shutting_down_answers_long_polls_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut command = std::process::Command::new(crate::support::BINARY);
    command
        .env("DATABASE_URL", &db.url)
        .env("SHUTDOWN_GRACE", "30s")
        .env("RUST_LOG", "warn");
    let (mut server, metrics) = BinaryServer::spawn_with_metrics(command).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let mut client = WorkerServiceClient::new(channel);
    let long_poll = tokio::spawn(async move {
        client
            .lease_tasks(LeaseTasksRequest {
                worker_id: "w".into(),
                wait: Some(seconds(60.0)),
                ..Default::default()
            })
            .await
    });
    polls_waiting(&format!("http://{metrics}/metrics"), 1.0).await;

    server.terminate();

    let answer = tokio::time::timeout(Duration::from_secs(15), long_poll)
        .await
        .expect("answered at shutdown, not held for the grace period")
        .expect("join")
        .expect("an answer, not a cut connection");
    assert!(answer.into_inner().leases.is_empty());
    assert_eq!(
        server.wait_for_exit(Duration::from_secs(15)).code(),
        Some(0)
    );
}

async fn the_last_allowed_attempt_ends_the_task_failed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.queue.max_attempts = 2;
    let app = TestApp::spawn_with(settings).await;
    let by_failure = app.create_email().await;

    let first = lease_one(&app).await;
    fail(&app, &first, false, Some(0.0)).await.expect("fail");
    let second = lease_one(&app).await;
    let last = fail(&app, &second, false, Some(0.0)).await.expect("fail");

    assert_eq!(last.status(), TaskStatus::Failed);
    assert_eq!(last.attempt, 2);
    assert_eq!(last.error_message, "the mail server said 451");
    assert!(lease(&app, 1, 30.0, 0.0).await.is_empty());
    assert_eq!(
        app.task(&by_failure.task_id).await.status(),
        TaskStatus::Failed
    );
}

async fn leases_that_keep_expiring_end_the_task_failed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.queue.max_attempts = 2;
    let app = TestApp::spawn_with(settings).await;
    let created = app.create_email().await;
    lease(&app, 1, 1.0, 0.0).await.remove(0);
    let second = lease(&app, 1, 1.0, 30.0).await.remove(0);
    until_expired(&second).await;

    let third = lease(&app, 1, 30.0, 0.0).await;

    assert!(third.is_empty(), "no attempt is left");
    let task = app.task(&created.task_id).await;
    assert_eq!(task.status(), TaskStatus::Failed);
    assert_eq!(task.attempt, 2);
    assert!(
        task.error_message.contains("expired"),
        "{}",
        task.error_message
    );
}

async fn a_permanent_failure_ends_the_task_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create_email().await;
    let leased = lease_one(&app).await;

    let failed = fail(&app, &leased, true, None).await.expect("fail");

    assert_eq!(failed.status(), TaskStatus::Failed);
    assert_eq!(failed.attempt, 1);
    assert!(lease(&app, 1, 30.0, 0.0).await.is_empty());
}

async fn wait_task_returns_when_another_client_completes_the_task(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (_server, metrics, app) = start_without_rechecks(&db).await;
    let created = app.create_email().await;
    let waiting = {
        let app = app.clone();
        let id = created.task_id.clone();
        tokio::spawn(async move { wait(&app, &id, LONG_WAIT).await })
    };
    let leased = lease_one(&app).await;
    waits_started(&metrics, 1).await;

    complete(&app, &leased, json!({"message_id": "m-1"}))
        .await
        .expect("complete");

    let done = woken(waiting).await.expect("wait");
    assert_eq!(done.status(), TaskStatus::Succeeded);
    assert_eq!(
        done.result,
        oncely_client::json::to_struct(json!({"message_id": "m-1"})).ok()
    );
}

async fn wait_task_returns_the_task_as_it_is_when_its_timeout_runs_out(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;

    let task = wait(&app, &created.task_id, 0.3).await.expect("wait");

    assert_eq!(task.status(), TaskStatus::Queued);
    assert_eq!(task.task_id, created.task_id);
}

async fn a_wait_ends_before_the_calls_own_deadline(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    let mut request = tonic::Request::new(WaitTaskRequest {
        task_id: created.task_id.clone(),
        timeout: Some(seconds(30.0)),
    });
    // Long enough that the server keeps back its full second for the
    // answer to arrive.
    request.set_timeout(Duration::from_secs(10));

    let answer = app.tasks.clone().wait_task(request).await;

    let task = answer.expect("an answer within the deadline, not DEADLINE_EXCEEDED");
    assert_eq!(task.into_inner().status(), TaskStatus::Queued);
}

async fn cancelling_stops_queued_and_running_tasks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let queued = app.create_email().await;
    let running = app.create_email().await;
    let cancelled = cancel(&app, &queued.task_id).await.expect("cancel queued");
    let leased = lease_one(&app).await;
    assert_eq!(
        task_id(&leased),
        running.task_id,
        "a cancelled task is never leased"
    );

    let stopped = cancel(&app, &running.task_id)
        .await
        .expect("cancel running");

    assert_eq!(cancelled.status(), TaskStatus::Cancelled);
    assert_eq!(stopped.status(), TaskStatus::Cancelled);
    assert_status(
        renew(&app, &leased).await,
        Code::FailedPrecondition,
        Some("TASK_CANCELLED"),
    );
    assert_status(
        complete(&app, &leased, json!({})).await,
        Code::FailedPrecondition,
        Some("TASK_CANCELLED"),
    );
    let again = cancel(&app, &running.task_id).await.expect("cancel again");
    assert_eq!(again, stopped, "a finished task is returned unchanged");
    assert_eq!(
        wait(&app, &queued.task_id, 5.0)
            .await
            .expect("wait")
            .status(),
        TaskStatus::Cancelled
    );
}

async fn a_finished_task_cannot_be_cancelled(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create_email().await;
    let leased = lease_one(&app).await;
    let done = complete(&app, &leased, json!({})).await.expect("complete");

    let after = cancel(&app, &done.task_id).await.expect("cancel");

    assert_eq!(after, done);
}

async fn bad_worker_calls_are_refused_and_change_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.limits.max_parameters_bytes = 100;
    let app = TestApp::spawn_with(settings).await;
    app.create_email().await;
    let leased = lease_one(&app).await;
    let mut client = workers(&app);

    let bad_lease = client
        .lease_tasks(LeaseTasksRequest {
            worker_id: String::new(),
            max_tasks: 101,
            lease_duration: Some(seconds(7200.0)),
            ..Default::default()
        })
        .await;
    let bad_ids = client
        .complete_task(CompleteTaskRequest {
            task_id: "not-a-uuid".into(),
            lease_token: "nope".into(),
            result: None,
        })
        .await;
    let mut nan = oncely_client::json::to_struct(json!({"x": 1})).expect("object");
    if let Some(value) = nan.fields.get_mut("x") {
        value.kind = Some(prost_types::value::Kind::NumberValue(f64::NAN));
    }
    let bad_result = client
        .complete_task(CompleteTaskRequest {
            task_id: task_id(&leased),
            lease_token: leased.lease_token.clone(),
            result: Some(nan),
        })
        .await;
    let too_big = complete(&app, &leased, json!({"s": "x".repeat(200)})).await;
    let unknown = complete(
        &app,
        &Lease {
            task: Some(Task {
                task_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            }),
            ..leased.clone()
        },
        json!({}),
    )
    .await;

    let status = assert_invalid(bad_lease, "INVALID_REQUEST");
    assert_eq!(
        violated_fields(&status),
        ["worker_id", "max_tasks", "lease_duration"]
    );
    let status = assert_invalid(bad_ids, "INVALID_REQUEST");
    assert_eq!(violated_fields(&status), ["task_id", "lease_token"]);
    let status = assert_invalid(bad_result, "INVALID_REQUEST");
    assert_eq!(violated_fields(&status), ["result.x"]);
    let status = assert_invalid(too_big, "INVALID_REQUEST");
    assert_eq!(violated_fields(&status), ["result"]);
    assert_eq!(unknown.expect_err("unknown").code(), Code::NotFound);
    let task = app.task(&task_id(&leased)).await;
    assert_eq!(task.status(), TaskStatus::Running);
    assert!(task.result.is_none());
}

async fn a_replay_of_create_shows_the_first_response_while_get_shows_the_current_state(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let first = app.create_with_key(&key).await.into_inner();
    let leased = lease_one(&app).await;
    complete(&app, &leased, json!({"ok": true}))
        .await
        .expect("complete");

    let replay = app
        .create(Some(&key), email_request())
        .await
        .expect("replay")
        .into_inner();
    let now = app.task(&first.task_id).await;

    assert_eq!(replay, first);
    assert_eq!(replay.status(), TaskStatus::Queued);
    assert_eq!(now.status(), TaskStatus::Succeeded);
    assert_eq!(now.attempt, 1);
}

async fn workers_lease_only_the_actions_they_perform(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    app.create(Some(&new_key()), request("a", "send_sms", json!({})))
        .await
        .expect("create");
    let email = app.create_email().await;

    let leases = leases(
        workers(&app),
        LeaseTasksRequest {
            worker_id: "mailer".into(),
            actions: vec!["send_email".into()],
            max_tasks: 10,
            ..Default::default()
        },
    )
    .await;

    assert_eq!(leases.len(), 1);
    assert_eq!(task_id(&leases[0]), email.task_id);
}

/// The environment variable that tells [`worker_process_that_hangs_after_leasing`]
/// which server to lease from.
const HANGING_WORKER_SERVER: &str = "ONCELY_TEST_HANGING_WORKER_SERVER";

/// Not a test of its own: the body of the worker process that
/// `a_worker_killed_mid_lease_has_its_task_finished_by_another` starts (this
/// test binary, run again) and kills. It leases one task for a second and
/// hangs, as a worker stuck in its side effect would.
#[tokio::test]
#[ignore = "the child process of a_worker_killed_mid_lease_has_its_task_finished_by_another"]
async fn worker_process_that_hangs_after_leasing() {
    let server = std::env::var(HANGING_WORKER_SERVER)
        .expect("run by a_worker_killed_mid_lease_has_its_task_finished_by_another");
    let channel = tonic::transport::Endpoint::from_shared(server)
        .expect("address")
        .connect()
        .await
        .expect("connect");
    let leases = leases(
        WorkerServiceClient::new(channel),
        LeaseTasksRequest {
            worker_id: "doomed-worker".into(),
            lease_duration: Some(seconds(1.0)),
            wait: Some(seconds(10.0)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(leases.len(), 1);
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

async fn a_worker_killed_mid_lease_has_its_task_finished_by_another(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    let mut doomed = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "worker::worker_process_that_hangs_after_leasing",
            "--ignored",
        ])
        .env(HANGING_WORKER_SERVER, format!("http://{}", app.addr))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the worker process");
    crate::support::eventually(Duration::from_secs(20), "the worker to lease", || async {
        (app.task(&created.task_id).await.status() == TaskStatus::Running).then_some(())
    })
    .await;

    doomed.kill().expect("SIGKILL the worker");
    doomed.wait().expect("reap the worker");
    let rescued = lease(&app, 1, 30.0, 30.0).await.remove(0);
    let done = complete(&app, &rescued, json!({"sent": true}))
        .await
        .expect("complete");

    assert_eq!(task_id(&rescued), created.task_id);
    assert_eq!(done.status(), TaskStatus::Succeeded);
    assert_eq!(done.attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_and_waiters_on_two_instances_see_each_others_tasks() {
    let db = TestDb::new(Backend::Postgres).await;
    let (_front_server, front_metrics, front) = start_without_rechecks(&db).await;
    let (_back_server, back_metrics, back) = start_without_rechecks(&db).await;
    let polling = poll_that_waits(&back, &back_metrics).await;

    let created = front.create_email().await;
    let waiting = {
        let front = front.clone();
        let id = created.task_id.clone();
        tokio::spawn(async move { wait(&front, &id, LONG_WAIT).await })
    };
    let leased = woken(polling).await.remove(0);
    waits_started(&front_metrics, 1).await;
    complete(&back, &leased, json!({"sent": true}))
        .await
        .expect("complete on the other instance");

    assert_eq!(task_id(&leased), created.task_id);
    let done = woken(waiting).await.expect("wait");
    assert_eq!(done.status(), TaskStatus::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_calls_answer_unavailable_while_the_database_is_down() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = crate::support::PgProxy::start(&db).await;
    let app = TestApp::spawn_with(test_settings(&db.url_via(proxy.port))).await;
    app.create_email().await;
    let leased = lease_one(&app).await;
    proxy.cut();

    let down = complete(&app, &leased, json!({})).await;

    assert_status(down, Code::Unavailable, Some("DATABASE_UNAVAILABLE"));
    proxy.restore();
    crate::support::eventually(Duration::from_secs(15), "the completion", || async {
        complete(&app, &leased, json!({})).await.ok()
    })
    .await;
}

/// Twenty tasks of dense numbers are 6.6 MB of protobuf: one lease of all
/// of them would be past the client's 4 MiB and lost (leased, never seen).
async fn a_lease_of_large_tasks_is_cut_to_what_a_client_can_receive(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let ones = vec![1; 30_000];
    let mut created = HashSet::new();
    for i in 0..20 {
        let task = app
            .create(
                Some(&new_key()),
                request("dense", "step", json!({"i": i, "n": ones})),
            )
            .await
            .expect("create")
            .into_inner();
        created.insert(task.task_id);
    }

    let mut leased = HashSet::new();
    let mut calls = 0;
    while leased.len() < created.len() && calls < 20 {
        let leases = lease(&app, 100, 60.0, 0.0).await;
        calls += 1;
        assert!(!leases.is_empty(), "a lease call got nothing");
        for lease in &leases {
            assert!(leased.insert(task_id(lease)), "leased twice");
        }
    }

    assert_eq!(leased, created);
    assert!(calls >= 3, "{calls} calls");
}

conformance!(
    a_lease_of_large_tasks_is_cut_to_what_a_client_can_receive,
    a_worker_killed_mid_lease_has_its_task_finished_by_another,
    racing_workers_complete_every_task_exactly_once,
    a_long_poll_answers_as_soon_as_a_task_is_created,
    a_long_poll_with_nothing_to_do_answers_empty_when_its_wait_runs_out,
    an_expired_lease_is_leased_again_and_the_old_token_refused,
    renewing_a_lease_extends_it,
    a_repeated_completion_returns_the_same_task,
    completions_at_once_each_get_their_own_outcome,
    a_completion_the_database_refuses_fails_alone_in_its_batch,
    a_lease_the_database_refuses_fails_alone_in_its_batch,
    a_retryable_failure_is_leased_again_after_its_backoff,
    the_server_backoff_is_random_up_to_a_doubling_capped_ceiling,
    a_task_failed_without_delay_wakes_a_waiting_worker,
    a_task_failed_for_its_last_lease_does_not_take_a_place_in_the_poll,
    shutting_down_answers_long_polls_at_once,
    the_last_allowed_attempt_ends_the_task_failed,
    leases_that_keep_expiring_end_the_task_failed,
    a_permanent_failure_ends_the_task_at_once,
    wait_task_returns_when_another_client_completes_the_task,
    wait_task_returns_the_task_as_it_is_when_its_timeout_runs_out,
    a_wait_ends_before_the_calls_own_deadline,
    cancelling_stops_queued_and_running_tasks,
    a_finished_task_cannot_be_cancelled,
    bad_worker_calls_are_refused_and_change_nothing,
    a_replay_of_create_shows_the_first_response_while_get_shows_the_current_state,
    workers_lease_only_the_actions_they_perform,
);

//! The Rust client's `Worker` against the real server: its lease loop,
//! heartbeats, reports, cancellation and graceful stop.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use oncely::proto::tasks_v1::{Task, TaskStatus};
use oncely_client::{CancelReason, TaskContext, TaskError, Worker, WorkerOptions};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::support::{Backend, TestApp, TestDb, eventually, new_key};

fn options(id: &str) -> WorkerOptions {
    WorkerOptions {
        poll_wait: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerOptions::new(id)
    }
}

/// Runs `worker` with `handler` in the background; the sender stops it.
fn start<H, Fut>(
    worker: Worker,
    handler: H,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), oncely_client::ClientError>>,
)
where
    H: Fn(Task, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(async move { worker.run(handler, stopped).await });
    (stop, running)
}

#[track_caller]
fn wait_for_status<'a>(
    app: &'a TestApp,
    task_id: &'a str,
    status: TaskStatus,
) -> impl Future<Output = Task> + 'a {
    eventually(
        Duration::from_secs(20),
        format!("task {task_id} to be {status:?}"),
        move || async move {
            let task = app.task(task_id).await;
            (task.status() == status).then_some(task)
        },
    )
}

async fn workers_run_every_task_once_and_report_the_handlers_result(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    db.insert_tasks("bulk", 200).await;
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();

    let workers: Vec<_> = (0..3)
        .map(|w| {
            let runs = runs.clone();
            let worker = Worker::new(app.channel.clone(), options(&format!("helper-{w}")));
            start(worker, move |task: Task, ctx: TaskContext| {
                let runs = runs.clone();
                async move {
                    *runs
                        .lock()
                        .expect("lock")
                        .entry(task.task_id.clone())
                        .or_default() += 1;
                    Ok(json!({"key": ctx.idempotency_key(), "by": w}))
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(60), "every task to succeed", || async {
        (db.count_tasks_with_status(TaskStatus::Succeeded).await == 200).then_some(())
    })
    .await;
    for (stop, running) in workers {
        let _ = stop.send(());
        running.await.expect("join").expect("a graceful stop");
    }

    let runs = runs.lock().expect("lock").clone();
    assert_eq!(runs.len(), 200);
    assert!(runs.values().all(|n| *n == 1), "a task ran twice: {runs:?}");
    let some_task = runs.keys().next().expect("a task");
    let done = app.task(some_task).await;
    let result = oncely_client::json::from_struct(&done.result.expect("a result"));
    assert_eq!(result["key"], json!(some_task));
}

async fn heartbeats_keep_a_task_longer_than_its_lease(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    // A heartbeat every second, and three seconds more before the lease
    // runs out: a late heartbeat on a busy machine still comes in time.
    let lease = Duration::from_secs(4);
    let worker = Worker::new(
        app.channel.clone(),
        WorkerOptions {
            lease_duration: lease,
            heartbeats_per_lease: 4,
            ..options("slow")
        },
    );

    // The handler outlives the lease by half of it.
    let (stop, running) = start(worker, move |_task, _ctx| async move {
        tokio::time::sleep(lease * 3 / 2).await;
        Ok(json!({"slow": true}))
    });
    let done = wait_for_status(&app, &created.task_id, TaskStatus::Succeeded).await;
    let _ = stop.send(());
    running.await.expect("join").expect("stop");

    assert_eq!(done.attempt, 1, "renewed, never leased again");
}

async fn handler_errors_fail_the_attempt_and_panics_are_retried(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let doomed = app
        .create(
            Some(&new_key()),
            crate::support::request("a", "refuse", json!({})),
        )
        .await
        .expect("create")
        .into_inner();
    let flaky = app
        .create(
            Some(&new_key()),
            crate::support::request("a", "flaky", json!({})),
        )
        .await
        .expect("create")
        .into_inner();
    let worker = Worker::new(app.channel.clone(), options("judge"));

    let (stop, running) = start(worker, |task: Task, ctx: TaskContext| async move {
        match (task.action.as_str(), ctx.attempt()) {
            ("refuse", _) => Err(TaskError::permanent("the address does not exist")),
            ("flaky", 1) => panic!("the mail library panicked"),
            _ => Ok(json!({"attempt": ctx.attempt()})),
        }
    });
    let refused = wait_for_status(&app, &doomed.task_id, TaskStatus::Failed).await;
    let recovered = wait_for_status(&app, &flaky.task_id, TaskStatus::Succeeded).await;
    let _ = stop.send(());
    running.await.expect("join").expect("stop");

    assert_eq!(refused.error_message, "the address does not exist");
    assert_eq!(refused.attempt, 1);
    assert_eq!(recovered.attempt, 2);
}

async fn a_cancelled_task_tells_its_handler_at_the_next_heartbeat(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    let seen: Arc<Mutex<Option<CancelReason>>> = Arc::default();
    // A heartbeat every second, and nine seconds more before the lease
    // runs out: a late heartbeat finds the task cancelled, not the lease
    // lost.
    let worker = Worker::new(
        app.channel.clone(),
        WorkerOptions {
            lease_duration: Duration::from_secs(10),
            heartbeats_per_lease: 10,
            ..options("patient")
        },
    );
    let (stop, running) = {
        let seen = seen.clone();
        start(worker, move |_task, ctx: TaskContext| {
            let seen = seen.clone();
            async move {
                let reason = tokio::time::timeout(Duration::from_secs(20), ctx.cancelled()).await;
                *seen.lock().expect("lock") = reason.ok();
                Ok(json!({"finished": "anyway"}))
            }
        })
    };
    wait_for_status(&app, &created.task_id, TaskStatus::Running).await;

    app.tasks
        .clone()
        .cancel_task(oncely::proto::tasks_v1::CancelTaskRequest {
            task_id: created.task_id.clone(),
        })
        .await
        .expect("cancel");
    eventually(Duration::from_secs(20), "the handler to learn", || async {
        seen.lock().expect("lock").is_some().then_some(())
    })
    .await;
    let _ = stop.send(());
    running.await.expect("join").expect("stop");

    assert_eq!(
        *seen.lock().expect("lock"),
        Some(CancelReason::TaskCancelled)
    );
    let task = app.task(&created.task_id).await;
    assert_eq!(task.status(), TaskStatus::Cancelled);
    assert!(
        task.result.is_none(),
        "a cancelled task's result is not reported"
    );
}

async fn a_graceful_stop_releases_unfinished_work_to_another_worker(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let created = app.create_email().await;
    let worker = Worker::new(
        app.channel.clone(),
        WorkerOptions {
            shutdown_grace: Duration::from_millis(300),
            ..options("leaving")
        },
    );
    let (stop, running) = start(worker, |_task, _ctx| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(json!({}))
    });
    wait_for_status(&app, &created.task_id, TaskStatus::Running).await;

    let _ = stop.send(());
    running.await.expect("join").expect("a graceful stop");
    let released = app.task(&created.task_id).await;
    let successor = Worker::new(app.channel.clone(), options("successor"));
    let (stop, running) = start(successor, |_task, ctx: TaskContext| async move {
        Ok(json!({"attempt": ctx.attempt()}))
    });
    let done = wait_for_status(&app, &created.task_id, TaskStatus::Succeeded).await;
    let _ = stop.send(());
    running.await.expect("join").expect("stop");

    assert_eq!(
        released.status(),
        TaskStatus::Queued,
        "released, not left leased"
    );
    assert_eq!(done.attempt, 2);
}

conformance!(
    workers_run_every_task_once_and_report_the_handlers_result,
    heartbeats_keep_a_task_longer_than_its_lease,
    handler_errors_fail_the_attempt_and_panics_are_retried,
    a_cancelled_task_tells_its_handler_at_the_next_heartbeat,
    a_graceful_stop_releases_unfinished_work_to_another_worker,
);

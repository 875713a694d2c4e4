//! A duplicate that arrives while the first request is still in flight.
//!
//! The first request is played by the test itself: it opens a transaction
//! and writes the key record and task exactly as the server does, without
//! committing. That is what another instance's in-flight request looks like
//! to the server under test.

use std::time::Duration;

use oncely::{
    domain::{Limits, NewTask},
    idempotency::{CREATE_TASK_SCOPE, Fingerprint},
    proto::tasks_v1::{CreateTaskRequest, Task, TaskStatus},
};
use prost::Message;
use sqlx::{Postgres, Transaction};
use tonic::Code;

use crate::helpers::{
    TestApp, TestDb, assert_status, email_request, new_key, replayed, request, test_settings,
};
use tonic_types::StatusExt;

/// Writes `request`'s key record and task in an open transaction.
async fn begin_in_flight<'a>(
    db: &'a TestDb,
    key: &str,
    request: &CreateTaskRequest,
) -> (Transaction<'a, Postgres>, Task) {
    let new_task = NewTask::parse(request.clone(), &Limits::default()).expect("valid");
    let task = Task {
        task_id: uuid::Uuid::new_v4().to_string(),
        agent_id: new_task.agent_id.clone(),
        action: new_task.action.clone(),
        parameters: request.parameters.clone(),
        status: TaskStatus::Queued as i32,
        create_time: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        result: None,
    };
    let task_id = uuid::Uuid::parse_str(&task.task_id).expect("uuid");
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO tasks (task_id, agent_id, action, parameters, status, create_time) \
         VALUES ($1, $2, $3, $4::jsonb, 1, now())",
    )
    .bind(task_id)
    .bind(&new_task.agent_id)
    .bind(&new_task.action)
    .bind(&new_task.parameters_json)
    .execute(&mut *tx)
    .await
    .expect("insert task");
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, fingerprint, task_id, response) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(CREATE_TASK_SCOPE)
    .bind(key)
    .bind(Fingerprint::of_new_task(CREATE_TASK_SCOPE, &new_task).as_bytes())
    .bind(task_id)
    .bind(task.encode_to_vec())
    .execute(&mut *tx)
    .await
    .expect("insert key");
    (tx, task)
}

#[tokio::test]
async fn a_duplicate_waits_for_the_first_request_and_then_replays_it() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let (tx, first) = begin_in_flight(&db, &key, &email_request()).await;

    let duplicate = tokio::spawn({
        let tasks = app.tasks.clone();
        let key = key.clone();
        async move {
            tasks
                .clone()
                .create_task(crate::helpers::keyed(Some(&key), email_request()))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !duplicate.is_finished(),
        "the duplicate should wait for the first request"
    );
    tx.commit().await.expect("commit");

    let response = duplicate.await.expect("join").expect("replay");
    assert_eq!(replayed(&response), Some("true"));
    assert_eq!(response.into_inner(), first);
    assert_eq!(db.count("tasks").await, 1);
}

#[tokio::test]
async fn a_different_request_waits_for_the_first_and_is_then_refused() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let (tx, _) = begin_in_flight(&db, &key, &email_request()).await;

    let other = tokio::spawn({
        let tasks = app.tasks.clone();
        let key = key.clone();
        async move {
            let other = request("agent-7", "send_sms", serde_json::json!({}));
            tasks
                .clone()
                .create_task(crate::helpers::keyed(Some(&key), other))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !other.is_finished(),
        "the request should wait for the first"
    );
    tx.commit().await.expect("commit");

    assert_status(
        other.await.expect("join"),
        Code::FailedPrecondition,
        Some("IDEMPOTENCY_KEY_REUSED"),
    );
    assert_eq!(db.count("tasks").await, 1);
}

#[tokio::test]
async fn when_the_first_request_fails_the_waiting_duplicate_executes() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let key = new_key();
    let (tx, first) = begin_in_flight(&db, &key, &email_request()).await;

    let duplicate = tokio::spawn({
        let tasks = app.tasks.clone();
        let key = key.clone();
        async move {
            tasks
                .clone()
                .create_task(crate::helpers::keyed(Some(&key), email_request()))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await.expect("rollback");

    let response = duplicate.await.expect("join").expect("created");
    assert_eq!(replayed(&response), Some("false"));
    assert_ne!(response.into_inner().task_id, first.task_id);
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

#[tokio::test]
async fn a_duplicate_still_unfinished_after_the_wait_bound_is_aborted_with_retry_info() {
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_millis(300);
    let app = TestApp::spawn_with(settings).await;
    let key = new_key();
    let (tx, first) = begin_in_flight(&db, &key, &email_request()).await;

    let status = assert_status(
        app.create(Some(&key), email_request()).await,
        Code::Aborted,
        Some("IDEMPOTENCY_REQUEST_IN_PROGRESS"),
    );
    let retry_info = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry_info.retry_delay.is_some_and(|d| d > Duration::ZERO));

    tx.commit().await.expect("commit");
    let retry = app
        .create(Some(&key), email_request())
        .await
        .expect("retry");
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.into_inner(), first);
    assert_eq!(db.count("tasks").await, 1);
}

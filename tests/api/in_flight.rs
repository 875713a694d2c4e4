//! A duplicate that arrives while the first request is still in flight.
//!
//! The first request is played by the test itself: it opens a transaction
//! and writes the key record and task exactly as the server does, without
//! committing. That is what another instance's in-flight request looks like
//! to the server under test.

use crate::support::Backend;

use std::time::Duration;

use oncely::proto::tasks_v1::{CreateTaskRequest, Task};
use tokio::task::JoinHandle;
use tonic::{Code, Response, Status};

use crate::support::{
    BinaryApp, OpenTransaction, TestApp, TestDb, assert_status, email_request, eventually, new_key,
    replayed, request, test_settings,
};

/// The binary, waiting far longer for a request in flight than the test
/// takes to end it.
async fn start_patient(db: &TestDb) -> BinaryApp {
    BinaryApp::start(db, &[("IN_FLIGHT_WAIT", "60s")]).await
}

/// The first request with `key` held in flight (see above), and `second`,
/// sent with the same key, seen waiting behind it.
async fn waiting_behind_the_first(
    db: &TestDb,
    app: &BinaryApp,
    key: &str,
    second: CreateTaskRequest,
) -> (
    OpenTransaction,
    Task,
    JoinHandle<Result<Response<Task>, Status>>,
) {
    let (tx, first) = db.begin_in_flight(key, &email_request()).await;
    let second = app.spawn_create(key, second);
    app.blocked(db, "CreateTask", 1).await;
    (tx, first, second)
}

/// How long a test watches a waiting request not answer.
const WATCH: Duration = Duration::from_millis(500);
use tonic_types::StatusExt;

async fn a_duplicate_waits_for_the_first_request_and_then_replays_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = start_patient(&db).await;
    let key = new_key();
    let (tx, first, duplicate) = waiting_behind_the_first(&db, &app, &key, email_request()).await;
    tokio::time::sleep(WATCH).await;
    assert!(
        !duplicate.is_finished(),
        "the duplicate should wait for the first request"
    );
    tx.commit().await;

    let response = duplicate.await.expect("join").expect("replay");
    assert_eq!(replayed(&response), Some("true"));
    assert_eq!(response.into_inner(), first);
    assert_eq!(db.count("tasks").await, 1);
}

async fn a_different_request_waits_for_the_first_and_is_then_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = start_patient(&db).await;
    let key = new_key();
    let (tx, _, other) = waiting_behind_the_first(
        &db,
        &app,
        &key,
        request("agent-7", "send_sms", serde_json::json!({})),
    )
    .await;
    tokio::time::sleep(WATCH).await;
    assert!(
        !other.is_finished(),
        "the request should wait for the first"
    );
    tx.commit().await;

    assert_status(
        other.await.expect("join"),
        Code::FailedPrecondition,
        Some("IDEMPOTENCY_KEY_REUSED"),
    );
    assert_eq!(db.count("tasks").await, 1);
}

async fn when_the_first_request_fails_the_waiting_duplicate_executes(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = start_patient(&db).await;
    let key = new_key();
    let (tx, first, duplicate) = waiting_behind_the_first(&db, &app, &key, email_request()).await;
    tx.rollback().await;

    let response = duplicate.await.expect("join").expect("created");
    assert_eq!(replayed(&response), Some("false"));
    assert_ne!(response.into_inner().task_id, first.task_id);
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn a_duplicate_still_unfinished_after_the_wait_bound_is_aborted_with_retry_info(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    // On SQLite the bound covers the wait for the one writer too: long
    // enough that a busy machine's writer surely finds the key held (and
    // answers ABORTED) before it runs out (which would be UNAVAILABLE).
    settings.database.in_flight_wait = Duration::from_secs(3);
    let app = TestApp::spawn_with(settings).await;
    let key = new_key();
    let (tx, first) = db.begin_in_flight(&key, &email_request()).await;

    let status = assert_status(
        app.create(Some(&key), email_request()).await,
        Code::Aborted,
        Some("IDEMPOTENCY_REQUEST_IN_PROGRESS"),
    );
    let retry_info = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry_info.retry_delay.is_some_and(|d| d > Duration::ZERO));

    tx.commit().await;
    let retry = app
        .create(Some(&key), email_request())
        .await
        .expect("retry");
    assert_eq!(replayed(&retry), Some("true"));
    assert_eq!(retry.into_inner(), first);
    assert_eq!(db.count("tasks").await, 1);
}

/// A lock the database holds that is not the key's (a table lock, as DDL
/// takes) makes a claim wait, but it is the database being busy: answered
/// UNAVAILABLE, which clients retry, not IN_PROGRESS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_lock_is_not_a_request_in_flight() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_millis(300);
    let app = TestApp::spawn_with(settings).await;
    let lock = db.hold_writes().await;

    let answer = app.create(Some(&new_key()), email_request()).await;
    lock.rollback().await;

    let status = answer.expect_err("the claim waited out its bound");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Not "failed": a commit the database could not confirm may still show.
    assert!(
        status
            .message()
            .contains("whether this call took effect is unknown")
            && status.message().contains("same idempotency-key"),
        "{status:?}"
    );
    let created = app.create(Some(&new_key()), email_request()).await;
    assert_eq!(
        replayed(&created.expect("created once the lock is gone")),
        Some("false")
    );
}

/// The SQLite writer busy with other work past the wait bound is not a
/// request with this key in flight either: with a bound far shorter than a
/// commit, calls at once that the writer does not get to in time answer
/// UNAVAILABLE, none IN_PROGRESS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_congested_sqlite_writer_is_not_a_request_in_flight() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_millis(1);
    let app = TestApp::spawn_with(settings).await;

    let answers = crate::support::create_all_at_once(&[&app], 64, |_| Some(new_key())).await;

    let mut unavailable = 0;
    for answer in answers {
        match answer {
            Ok(response) => assert_eq!(replayed(&response), Some("false")),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "some calls outwaited the 1 ms bound");
}

/// A failover leaves the pool on a read-only standby for a while: writes
/// answer UNAVAILABLE (clients retry), never INTERNAL, and succeed once the
/// database takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_to_a_read_only_database_are_unavailable_until_it_takes_writes_again() {
    let db = TestDb::new(Backend::Postgres).await;
    let app = TestApp::spawn(&db).await;
    app.create(Some(&new_key()), email_request())
        .await
        .expect("created before the failover");
    db.set_read_only(true).await;

    for _ in 0..5 {
        let status = app
            .create(Some(&new_key()), email_request())
            .await
            .expect_err("a read-only database takes no task");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    db.set_read_only(false).await;
    let created = eventually(
        Duration::from_secs(30),
        "a create once the database takes writes",
        || async {
            match app.create(Some(&new_key()), email_request()).await {
                Ok(response) => Some(response),
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    None
                }
            }
        },
    )
    .await;
    assert_eq!(replayed(&created), Some("false"));
    assert_eq!(db.count("tasks").await, 2);
}

conformance!(
    a_duplicate_waits_for_the_first_request_and_then_replays_it,
    a_different_request_waits_for_the_first_and_is_then_refused,
    when_the_first_request_fails_the_waiting_duplicate_executes,
    a_duplicate_still_unfinished_after_the_wait_bound_is_aborted_with_retry_info,
);

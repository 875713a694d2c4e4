//! Health follows the database; shutdown is graceful.

use crate::support::Backend;

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    BinaryApp, PgProxy, TestApp, TestDb, assert_status, email_request, new_key, replayed,
    test_settings,
};

/// The longest a test waits for the server to act; it acts much sooner.
const PATIENCE: Duration = Duration::from_secs(20);

async fn health_is_serving_for_the_server_and_each_service(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;

    for service in ["", "tasks.v1.TaskService", "tasks.v1.Admin"] {
        assert_eq!(
            app.health(service).await.expect("check"),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = app
        .health("no.such.Service")
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn health_stays_serving_while_requests_hold_every_pooled_connection() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.database.max_connections = 2;
    let app = TestApp::spawn_with(settings).await;
    let lock = db.hold_writes().await;
    let waiting: Vec<_> = (0..2)
        .map(|_| app.spawn_create(&new_key(), email_request()))
        .collect();
    db.wait_for_sessions_waiting_for_a_lock(2).await;

    for _ in 0..8 {
        assert_eq!(app.health("").await.expect("check"), ServingStatus::Serving);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    lock.commit().await;
    for call in waiting {
        call.await.expect("join").expect("create");
    }
}

#[tokio::test]
async fn health_flips_when_the_database_goes_away_and_comes_back() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    let app = TestApp::spawn_with(test_settings(&db.url_via(proxy.port))).await;

    proxy.cut();
    app.wait_for_health(ServingStatus::NotServing).await;
    assert_eq!(
        app.health("tasks.v1.TaskService").await.expect("check"),
        ServingStatus::NotServing
    );
    proxy.restore();
    app.wait_for_health(ServingStatus::Serving).await;

    assert_eq!(
        app.health("tasks.v1.TaskService").await.expect("check"),
        ServingStatus::Serving
    );
}

/// While the database is out of reach, a replay is not answered from the
/// instance's memory (the database may come back with another history: a
/// failover that lost commits); once it is back with the same history, the
/// key replays again.
#[tokio::test]
async fn nothing_is_answered_from_memory_while_the_database_is_out_of_reach() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    let app = TestApp::spawn_with(test_settings(&db.url_via(proxy.port))).await;
    let key = new_key();
    let first = app
        .create(Some(&key), email_request())
        .await
        .expect("create");

    proxy.cut();
    app.wait_for_health(ServingStatus::NotServing).await;
    let status = app
        .create(Some(&key), email_request())
        .await
        .expect_err("no replay from memory while the database is away");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    proxy.restore();
    app.wait_for_health(ServingStatus::Serving).await;
    let replay = app
        .create(Some(&key), email_request())
        .await
        .expect("replayed once the database is back");
    assert_eq!(replayed(&replay), Some("true"));
    assert_eq!(replay.into_inner(), first.into_inner());
}

/// Health says whether a create can commit now, not only whether the
/// database answers a query: a database that takes no writes (a standby
/// after a failover, one set read-only) is NOT_SERVING, and SERVING again
/// once it takes writes. (`SELECT 1` answered all along.)
#[tokio::test]
async fn health_is_not_serving_while_the_database_cannot_commit() {
    let db = TestDb::new(Backend::Postgres).await;
    let app = TestApp::spawn(&db).await;
    app.wait_for_health(ServingStatus::Serving).await;

    db.set_read_only(true).await;
    app.wait_for_health(ServingStatus::NotServing).await;
    db.set_read_only(false).await;
    app.wait_for_health(ServingStatus::Serving).await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_and_a_retry_later_executes_afresh() {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = PgProxy::start(&db).await;
    let app = TestApp::spawn_with(test_settings(&db.url_via(proxy.port))).await;
    let key = new_key();

    proxy.cut();
    assert_status(
        app.create(Some(&key), email_request()).await,
        Code::Unavailable,
        Some("DATABASE_UNAVAILABLE"),
    );
    assert_eq!(db.count("idempotency_keys").await, 0);
    proxy.restore();
    app.wait_for_health(ServingStatus::Serving).await;
    let mut retry = app.create(Some(&key), email_request()).await;
    if retry.as_ref().is_err_and(|s| s.code() == Code::Unavailable) {
        // A pooled connection cut by the proxy may fail once more.
        retry = app.create(Some(&key), email_request()).await;
    }

    assert_eq!(replayed(&retry.expect("retry")), Some("false"));
    assert_eq!(db.count("tasks").await, 1);
    assert_eq!(db.count("idempotency_keys").await, 1);
}

async fn shutdown_reports_not_serving_and_finishes_in_flight_requests(backend: Backend) {
    let db = TestDb::new(backend).await;
    // A grace long enough that only a prompt, clean stop passes the
    // deadline below, and a request waiting far longer than the test.
    let mut app = BinaryApp::start(
        &db,
        &[("SHUTDOWN_GRACE", "120s"), ("IN_FLIGHT_WAIT", "60s")],
    )
    .await;
    let mut watch = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        watch
            .message()
            .await
            .expect("first")
            .expect("status")
            .status(),
        ServingStatus::Serving
    );
    // Hold a lock so a request is in flight when shutdown starts.
    let lock = db.hold_writes().await;
    let in_flight = app.spawn_create(&new_key(), email_request());
    app.blocked(&db, "CreateTask", 1).await;

    app.server.terminate();
    let status = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("a health update")
        .expect("stream")
        .expect("status");
    assert_eq!(status.status(), ServingStatus::NotServing);
    // The watch stream ends so it does not hold up the shutdown.
    let end = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!in_flight.is_finished());
    lock.commit().await;

    let response = in_flight
        .await
        .expect("join")
        .expect("the in-flight request completes");
    assert_eq!(replayed(&response), Some("false"));
    let exit = app.server.wait_for_exit(PATIENCE);
    assert_eq!(exit.code(), Some(0), "a clean exit");
    assert_eq!(db.count("tasks").await, 1);
}

async fn shutdown_stops_after_the_grace_period_even_if_a_request_hangs(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The request would hang for a minute; the grace is a second.
    let mut app =
        BinaryApp::start(&db, &[("SHUTDOWN_GRACE", "1s"), ("IN_FLIGHT_WAIT", "60s")]).await;
    let lock = db.hold_writes().await;
    let hanging = app.spawn_create(&new_key(), email_request());
    app.blocked(&db, "CreateTask", 1).await;

    app.server.terminate();
    let exit = app.server.wait_for_exit(PATIENCE);

    assert_eq!(exit.code(), Some(0), "a clean exit within the grace period");
    // Exiting ended the request: it was not waited for.
    let answer = hanging.await.expect("join");
    assert!(answer.is_err(), "{answer:?}");
    lock.rollback().await;
}

conformance!(
    health_is_serving_for_the_server_and_each_service,
    shutdown_reports_not_serving_and_finishes_in_flight_requests,
    shutdown_stops_after_the_grace_period_even_if_a_request_hangs,
);

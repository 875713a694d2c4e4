//! Rate limits per caller and the in-flight bound: RESOURCE_EXHAUSTED with
//! RetryInfo, and recovery.

use std::{num::NonZeroU32, time::Duration};

use oncely::proto::tasks_v1::{
    GetTaskRequest, LeaseTasksRequest, worker_service_client::WorkerServiceClient,
};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp, TestDb, assert_status, test_settings};

async fn get_unknown(app: &TestApp) -> Result<(), Status> {
    let call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    match app.tasks.clone().get_task(call).await {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status),
        Ok(_) => Ok(()),
    }
}

async fn a_caller_over_its_rate_is_told_when_to_come_back(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(2);
    settings.rate_limits.burst = NonZeroU32::new(2).expect("two");
    let app = TestApp::spawn_with(settings).await;

    get_unknown(&app).await.expect("first, within the burst");
    get_unknown(&app).await.expect("second, within the burst");
    let third = get_unknown(&app).await;

    let status = assert_status(third, Code::ResourceExhausted, Some("RATE_LIMITED"));
    let delay = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    get_unknown(&app)
        .await
        .expect("served again after the delay");
    app.health("").await.expect("health is never limited");
}

async fn calls_past_the_in_flight_bound_are_shed_not_queued(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.max_in_flight = 1;
    let app = TestApp::spawn_with(settings).await;
    let mut workers = WorkerServiceClient::new(app.channel.clone());
    let long_poll = tokio::spawn(async move {
        workers
            .lease_tasks(LeaseTasksRequest {
                worker_id: "w".into(),
                wait: Some(prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let shed = get_unknown(&app).await;

    let status = assert_status(shed, Code::ResourceExhausted, Some("OVERLOADED"));
    assert!(status.get_details_retry_info().is_some());
    app.health("").await.expect("health is never shed");
    long_poll
        .await
        .expect("join")
        .expect("the call in flight finishes");
    get_unknown(&app)
        .await
        .expect("served once the slot is free");
}

async fn each_api_key_has_a_bucket_of_its_own(backend: Backend) {
    let db = TestDb::new(backend).await;
    let busy = crate::auth::create_key(&db, "busy", "admin", &[]);
    let calm = crate::auth::create_key(&db, "calm", "admin", &[]);
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(1).expect("one");
    let app = TestApp::spawn_with(settings).await;
    let get = |token: &str| {
        let mut tasks = app.tasks.clone();
        let call = crate::auth::with_token(
            token,
            Request::new(GetTaskRequest {
                task_id: uuid::Uuid::new_v4().to_string(),
            }),
        );
        async move { tasks.get_task(call).await.map(drop) }
    };

    let first = get(&busy).await;
    let second = get(&busy).await;
    let other = get(&calm).await;

    assert_eq!(first.expect_err("not found").code(), Code::NotFound);
    assert_status(second, Code::ResourceExhausted, Some("RATE_LIMITED"));
    assert_eq!(
        other.expect_err("not found").code(),
        Code::NotFound,
        "its own bucket"
    );
}

async fn the_client_waits_out_a_rate_limit_as_retry_info_asks(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    settings.rate_limits.per_second = NonZeroU32::new(1);
    settings.rate_limits.burst = NonZeroU32::new(1).expect("one");
    let app = TestApp::spawn_with(settings).await;
    let client =
        oncely_client::OncelyClient::connect(format!("http://{}", app.addr)).expect("address");

    let first = client
        .create_task(crate::support::email_request())
        .await
        .expect("first");
    let second = client
        .create_task(crate::support::email_request())
        .await
        .expect("second, after waiting out the limit");

    assert_eq!(first.attempts, 1);
    assert!(second.attempts >= 2, "the second call met the limit first");
    assert_eq!(db.count("tasks").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_past_the_statement_timeout_is_cancelled_by_the_database() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.database.in_flight_wait = Duration::from_secs(10);
    settings.database.statement_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(settings).await;
    let mut lock = db.pg_pool().begin().await.expect("begin");
    sqlx::query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let mut call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    call.set_timeout(Duration::from_secs(5));

    let answer = app.tasks.clone().get_task(call).await;

    // Without the statement timeout the lock wait (10 s) would outlast the
    // caller's 5 s deadline.
    assert_status(answer, Code::Unavailable, Some("DATABASE_UNAVAILABLE"));
    lock.rollback().await.expect("rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_request_timeout_bounds_every_call_and_long_polls_answer_before_it() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.request_timeout = Duration::from_secs(1);
    settings.queue.request_timeout = Duration::from_secs(1);
    settings.database.in_flight_wait = Duration::from_secs(10);
    let app = TestApp::spawn_with(settings).await;
    let created = app
        .create(
            Some(&crate::support::new_key()),
            crate::support::email_request(),
        )
        .await
        .expect("create")
        .into_inner();
    let lock = db.hold_writes().await;

    let mut stuck = crate::support::keyed(
        Some(&crate::support::new_key()),
        crate::support::email_request(),
    );
    stuck.set_timeout(Duration::from_secs(5));
    let cut = app.tasks.clone().create_task(stuck).await;
    let waited = app
        .tasks
        .clone()
        .wait_task(oncely::proto::tasks_v1::WaitTaskRequest {
            task_id: created.task_id,
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        })
        .await;
    lock.rollback().await;

    // Without the server's timeout the write would wait for the caller's
    // 5 s deadline.
    let status = cut.expect_err("cut by the request timeout");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("request timeout of 1s"),
        "{status:?}"
    );
    let task = waited.expect("a long poll answers before the request timeout");
    assert_eq!(
        task.into_inner().status(),
        oncely::proto::tasks_v1::TaskStatus::Queued
    );
}

async fn oversized_metadata_is_refused_and_the_server_keeps_serving(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::spawn(&db).await;
    let mut call = Request::new(GetTaskRequest {
        task_id: uuid::Uuid::new_v4().to_string(),
    });
    let huge: tonic::metadata::MetadataValue<_> = "x".repeat(32 * 1024).parse().expect("metadata");
    call.metadata_mut().insert("x-padding", huge);

    let refused = app.tasks.clone().get_task(call).await;
    // The same on a raw connection, which does not check the server's
    // limit itself: the refusal comes from the server.
    let socket = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let (client, driver) = h2::client::handshake(socket).await.expect("h2 handshake");
    let driver = tokio::spawn(driver);
    let mut client = client.ready().await.expect("ready");
    let raw = http::Request::post(format!("http://{}/tasks.v1.TaskService/GetTask", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-padding", "x".repeat(32 * 1024))
        .body(())
        .expect("request");
    let answer = match client.send_request(raw, true) {
        Ok((answer, _)) => answer.await.map(|r| r.status()),
        Err(error) => Err(error),
    };

    let status = refused.expect_err("a 32 KiB header block is refused");
    assert_ne!(
        status.code(),
        Code::NotFound,
        "the call reached the service"
    );
    match answer {
        Ok(status) => assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(error) => assert!(error.is_remote() || error.is_reset(), "{error:?}"),
    }
    get_unknown(&app).await.expect("still serving");
    driver.abort();
}

conformance!(
    a_caller_over_its_rate_is_told_when_to_come_back,
    calls_past_the_in_flight_bound_are_shed_not_queued,
    each_api_key_has_a_bucket_of_its_own,
    the_client_waits_out_a_rate_limit_as_retry_info_asks,
    oversized_metadata_is_refused_and_the_server_keeps_serving,
);
